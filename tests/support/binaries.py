"""Finding the real programs the integration tests drive."""

import os
import shutil

import pytest


def require_binary(name: str) -> str:
    """The path of `name`; skips the test when it is missing, except under CI.

    CI installs every tool the suite uses, so a missing one there is a broken environment,
    and a silent skip would hide exactly the tests it was meant to run.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)")
    pytest.skip(message)
