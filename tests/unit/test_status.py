"""What the status page shows of the configuration."""

from mirror.services.status import shown_url


def test_an_upstream_url_is_shown_without_credentials() -> None:
    assert shown_url("https://registry-1.docker.io") == "https://registry-1.docker.io"
    assert shown_url("https://bot:s3cret@registry.corp:5000/v") == "https://registry.corp:5000/v"
