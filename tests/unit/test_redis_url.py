"""The Redis URL forms, Sentinel's among them, and the one line a bad one gets at start."""

import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from mirror.config import ConfigError, load
from mirror.content.redis_client import SentinelURL, connect, parse_sentinel_url


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    parsed = parse_sentinel_url("redis+sentinel://me:p%40ss@10.0.0.1:26379,[::1]:26380/cache/3")
    assert parsed == SentinelURL(
        (("10.0.0.1", 26379), ("::1", 26380)), "cache", 3, "me", "p@ss", tls=False
    )
    assert "p@ss" not in repr(parsed)


def test_a_sentinel_url_without_a_db_is_db_0_and_rediss_is_tls() -> None:
    parsed = parse_sentinel_url("rediss+sentinel://s1:26379/cache")
    assert (parsed.db, parsed.tls, parsed.username, parsed.password) == (0, True, None, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///cache", "no sentinel"),
        ("redis+sentinel://s1:26379", "no service name"),
        ("redis+sentinel://s1:26379/", "no service name"),
        ("redis+sentinel://s1/cache", "'s1': expected HOST:PORT"),
        ("redis+sentinel://s1:port/cache", "'s1:port': the port must be a number"),
        ("redis+sentinel://s1:70000/cache", "'s1:70000': the port must be a number"),
        ("redis+sentinel://s1:26379,/cache", "no sentinel"),
        ("redis+sentinel://::1:26379/cache", "an IPv6 address goes in brackets"),
        ("redis+sentinel://s1:26379/cache/one", "database 'one'"),
        ("redis+sentinel://s1:26379/cache/1/2", "got more"),
        ("redis+sentinel://s1:26379/cache?db=1", "takes no"),
        ("sentinel://s1:26379/cache", "expected a redis://"),
        ("redis://127.0.0.1:99999/0", "Port"),
        ("redis://127.0.0.1:6379/O", "database 'O'"),
    ],
)
def test_a_bad_redis_url_fails_the_start_with_one_line_naming_the_flag(
    url: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load({"redis_url": url}, env={})
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"bad value {url!r} for --redis-url: ")


def test_the_password_in_a_bad_redis_url_is_not_shown() -> None:
    with pytest.raises(ConfigError) as raised:
        load({"redis_url": "redis+sentinel://me:hunter2@s1:26379"}, env={})
    assert "hunter2" not in str(raised.value)
    assert "redis+sentinel://me:***@s1:26379" in str(raised.value)


def test_a_redis_ca_file_needs_a_tls_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    env = {"MIRROR_REDIS_CA_FILE": str(ca)}
    with pytest.raises(ConfigError, match="redis_ca_file needs a rediss://"):
        load({"redis_url": "redis://127.0.0.1:6379/0"}, env=env)
    settings = load({"redis_url": "rediss+sentinel://127.0.0.1:26379/cache"}, env=env)
    assert settings.redis_ca_file == ca


def test_a_redis_ca_file_that_holds_no_certificate_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"--redis-ca-file: .*holds no PEM CA certificate"):
        load({"redis_url": "rediss://127.0.0.1:6379/0", "redis_ca_file": str(junk)}, env={})


async def test_every_subcommand_reaches_a_sentinel_url_through_one_client() -> None:
    client = connect("redis+sentinel://me:secret@127.0.0.1:1,127.0.0.1:2/cache/4", timeout=0.5)
    try:
        pool = client.connection_pool
        assert pool.service_name == "cache"  # type: ignore[attr-defined]
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (4, "me", "secret")
        assert kwargs["decode_responses"] is False
    finally:
        await client.aclose()


def test_the_cli_refuses_a_bad_sentinel_url_with_one_line(tmp_path: Path) -> None:
    bad_url = ("--redis-url", "redis+sentinel://127.0.0.1:26379")
    for command in ("serve", "ls", "gc", "verify"):
        result = subprocess.run(
            [sys.executable, "-m", "mirror", command, "--data-dir", str(tmp_path), *bad_url],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "no service name" in result.stderr
