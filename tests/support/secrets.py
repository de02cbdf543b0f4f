"""The passwords and tokens the tests hand the mirror. None of them may ever reach a log:
``tests/conftest.py`` reads every log file the session wrote and fails if one does."""

CLIENT_USER = "alice"
CLIENT_PASSWORD = "correct-horse-Qx7-battery"
SECOND_PASSWORD = "second-staple-Zr2-login"
HUB_USER = "site-account"
HUB_PASSWORD = "hub-s3cret-Lk9-password"

ALL = (CLIENT_PASSWORD, SECOND_PASSWORD, HUB_PASSWORD)
