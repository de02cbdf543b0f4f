"""Settings precedence and the one-line errors users see for bad configuration."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mirror.config import DEFAULT_UPSTREAM, ConfigError, load
from mirror.domain.reference import DOCKER_HUB
from mirror.domain.rules import AccessRules
from tests.support.artifacts import new_key, public_pem


def test_defaults() -> None:
    settings = load({}, env={})
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 5000)
    assert settings.data_dir == Path("mirror-data")
    assert settings.upstreams[DOCKER_HUB].url == DEFAULT_UPSTREAM
    assert settings.redis_url is None
    assert settings.tag_ttl == 300


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("tag_ttl: 10\nlisten: 127.0.0.1:6000\ndata_dir: /from/file\n")
    env = {"MIRROR_TAG_TTL": "20", "MIRROR_DATA_DIR": "/from/env"}

    settings = load({"tag_ttl": "30"}, env=env, config_file=config)

    assert settings.tag_ttl == 30
    assert settings.data_dir == Path("/from/env")
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 6000)


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("upstream: http://127.0.0.1:9999/\n")
    settings = load({}, env={"MIRROR_CONFIG": str(config)})
    assert settings.upstreams[DOCKER_HUB].url == "http://127.0.0.1:9999"


def test_credentials_from_file_and_env_are_masked(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("upstream_username: me\nupstream_password: hunter2\n")
    settings = load({}, env={}, config_file=config)
    assert settings.upstreams[DOCKER_HUB].password == "hunter2"
    assert "hunter2" not in repr(settings)


@pytest.mark.parametrize(
    ("flags", "env", "file_text", "message"),
    [
        ({}, {}, "tag_tll: 5\n", "unknown key 'tag_tll'"),
        ({}, {"MIRROR_TAG_TLL": "5"}, None, "unknown environment variable MIRROR_TAG_TLL"),
        ({"tag_ttl": "soon"}, {}, None, "--tag-ttl"),
        ({"tag_ttl": "-1"}, {}, None, "--tag-ttl"),
        ({}, {"MIRROR_LISTEN": "5000"}, None, "MIRROR_LISTEN"),
        ({"listen": "host:99999"}, {}, None, "--listen"),
        ({"upstream": "ftp://x"}, {}, None, "--upstream"),
        ({"redis_url": "http://x"}, {}, None, "--redis-url"),
        ({}, {}, "- a\n- list\n", "must be a mapping"),
        ({}, {}, "key: [unclosed\n", "not valid YAML"),
        ({}, {}, "upstream_username: me\n", "must be given together"),
        ({"upstream_password": "x"}, {}, None, "unknown option --upstream-password"),
    ],
)
def test_bad_configuration_names_the_key(
    tmp_path: Path, flags: dict[str, str], env: dict[str, str], file_text: str | None, message: str
) -> None:
    config = None
    if file_text is not None:
        config = tmp_path / "mirror.yaml"
        config.write_text(file_text)
    with pytest.raises(ConfigError, match=message) as raised:
        load(flags, env=env, config_file=config)
    assert "\n" not in str(raised.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load({}, env={}, config_file=tmp_path / "absent.yaml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_cli_bad_value_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--tag-ttl", "banana", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--tag-ttl" in result.stderr


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_cli_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = f"127.0.0.1:{port}"
        result = run_cli("serve", "--listen", listen, "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the start-up log line
    assert line.startswith("mirror: error:")
    assert "address already in use" in line


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "config.example.yaml"
    settings = load({}, env={}, config_file=example)
    assert settings.upstreams[DOCKER_HUB].url == DEFAULT_UPSTREAM


def test_several_upstreams_from_flags_env_and_file(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "upstream: http://hub.internal:1\n"
        "upstreams:\n"
        "  ghcr.io: {url: 'http://ghcr.internal:2', username: bot, password: tok}\n"
        "  quay.io: http://quay.internal:3\n"
    )
    settings = load(
        {"upstream": ["registry.k8s.io=http://k8s.internal:4", "quay.io=http://quay2.internal:5"]},
        env={"MIRROR_UPSTREAM": "http://hub-env.internal:6"},
        config_file=config,
    )
    urls = {name: upstream.url for name, upstream in settings.upstreams.items()}
    assert urls == {
        "docker.io": "http://hub-env.internal:6",
        "ghcr.io": "http://ghcr.internal:2",
        "quay.io": "http://quay2.internal:5",
        "registry.k8s.io": "http://k8s.internal:4",
    }
    assert settings.upstreams["ghcr.io"].username == "bot"
    assert "tok" not in repr(settings)


@pytest.mark.parametrize(
    ("flags", "file_text", "message"),
    [
        ({"upstream": ["bad host=http://x"]}, None, "--upstream"),
        ({"upstream": ["ghcr.io=nope"]}, None, "--upstream"),
        ({}, "upstreams: {ghcr.io: {url: 'http://x', token: y}}\n", "unknown key 'token'"),
        ({}, "upstreams: [a, b]\n", "upstreams in"),
        ({}, "upstreams: {ghcr.io: {url: 'http://x', username: y}}\n", "given together"),
    ],
)
def test_bad_upstreams_name_the_key(
    tmp_path: Path, flags: dict[str, list[str]], file_text: str | None, message: str
) -> None:
    config = None
    if file_text is not None:
        config = tmp_path / "mirror.yaml"
        config.write_text(file_text)
    with pytest.raises(ConfigError, match=message):
        load(flags, env={}, config_file=config)


def test_disk_budget_keys_from_every_source(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text("max_cache_size: 50GiB\npins: ['library/postgres:16*', 'ghcr.io/acme/*']\n")
    settings = load(
        {"min_free_space": "2GiB"}, env={"MIRROR_EVICT_UNUSED_AFTER": "30d"}, config_file=config
    )
    assert settings.max_cache_size == 50 * 1024**3
    assert settings.min_free_space.of(10**12) == 2 * 1024**3
    assert settings.evict_unused_after == 30 * 86400
    assert [pin.text for pin in settings.pins] == ["library/postgres:16*", "ghcr.io/acme/*"]
    defaults = load({}, env={})
    assert defaults.max_cache_size is None
    assert defaults.min_free_space.of(1000) == 50
    assert defaults.evict_unused_after is None


def test_bad_budget_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match="--max-cache-size"):
        load({"max_cache_size": "lots"}, env={})
    with pytest.raises(ConfigError, match="MIRROR_MIN_FREE_SPACE"):
        load({}, env={"MIRROR_MIN_FREE_SPACE": "150%"})


def test_kubernetes_service_link_variables_are_not_settings() -> None:
    env = {
        "MIRROR_SERVICE_HOST": "10.0.0.7",
        "MIRROR_SERVICE_PORT": "5000",
        "MIRROR_SERVICE_PORT_HTTP": "5000",
        "MIRROR_PORT": "tcp://10.0.0.7:5000",
        "MIRROR_PORT_5000_TCP": "tcp://10.0.0.7:5000",
        "MIRROR_PORT_5000_TCP_ADDR": "10.0.0.7",
        "MIRROR_PORT_5000_TCP_PORT": "5000",
        "MIRROR_PORT_5000_TCP_PROTO": "tcp",
        "MIRROR_TAG_TTL": "7",
    }
    assert load({}, env=env).tag_ttl == 7
    with pytest.raises(ConfigError, match="MIRROR_TAG_TLL"):
        load({}, env={**env, "MIRROR_TAG_TLL": "5"})
    with pytest.raises(ConfigError, match="MIRROR_PORT_HTTP"):
        load({}, env={"MIRROR_PORT_HTTP": "5000"})


def test_manifest_cache_bytes_takes_units() -> None:
    assert load({"manifest_cache_bytes": "128MiB"}, env={}).manifest_cache_bytes == 128 * 1024**2
    assert load({}, env={}).manifest_cache_bytes == 64 * 1024**2


def test_security_keys_from_the_file(tmp_path: Path) -> None:
    passwords = tmp_path / "htpasswd"
    passwords.write_text("alice:$2y$05$abcdefghijklmnopqrstuv\n")
    secret = tmp_path / "hub-secret"
    secret.write_text("from-a-secret\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        f"auth: {{htpasswd: {passwords}, metrics: true}}\n"
        "repositories: {allow: ['docker.io/library/*'], deny: ['docker.io/library/bad']}\n"
        f"upstream_password_file: {secret}\nupstream_username: site\n"
        "client_miss_limit: 60/min\nclient_max_transfers: 8\n"
    )
    settings = load({}, env={}, config_file=config)
    assert settings.auth is not None
    assert (settings.auth.htpasswd, settings.auth.metrics) == (passwords, True)
    assert settings.repositories.permits(DOCKER_HUB, "library/alpine")
    assert not settings.repositories.permits(DOCKER_HUB, "library/bad")
    assert not settings.repositories.permits(DOCKER_HUB, "someorg/app")
    assert not settings.repositories.permits("ghcr.io", "library/alpine")
    hub = settings.upstreams[DOCKER_HUB]
    assert (hub.username, hub.password) == ("site", "from-a-secret")
    assert "from-a-secret" not in repr(settings)
    assert settings.client_miss_limit == 1.0
    assert settings.client_max_transfers == 8
    defaults = load({}, env={})
    assert defaults.auth is None
    assert defaults.repositories.permits("ghcr.io", "anything/at-all")
    assert defaults.client_miss_limit == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("auth: {htpasswd: /nonexistent}", "auth in .*: /nonexistent is not a readable file"),
        ("auth: {passwd: x}", "unknown key 'passwd'"),
        ("repositories: {allow: 'x', block: []}", "unknown key 'block'"),
        ("upstream_password_file: /nonexistent", "cannot read /nonexistent"),
        ("tls_cert: /nonexistent", "tls_cert in .*: /nonexistent is not a readable file"),
        (
            "upstreams: {docker.io: {password: a, password_file: /etc/hostname, username: u}}",
            "password and password_file",
        ),
    ],
)
def test_bad_security_keys_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load({}, env={}, config_file=config)


@pytest.mark.parametrize(
    ("env", "file_text", "message"),
    [
        ({}, "tag_tll: 5\n", r"unknown key 'tag_tll' in \S+ \(did you mean 'tag_ttl'\?\)$"),
        ({}, "datadir: /x\n", r"unknown key 'datadir' in \S+ \(did you mean 'data_dir'\?\)$"),
        ({}, "colour: blue\n", r"unknown key 'colour' in \S+$"),
        (
            {"MIRROR_TAG_TLL": "5"},
            None,
            r"^unknown environment variable MIRROR_TAG_TLL \(did you mean MIRROR_TAG_TTL\?\)$",
        ),
        (
            {},
            "upstreams: {ghcr.io: {url: 'http://x', usrename: y}}\n",
            r"unknown key 'usrename' under 'ghcr.io' \(did you mean 'username'\?\)$",
        ),
        ({}, "auth: {htpasswrd: x}\n", r"unknown key 'htpasswrd' \(did you mean 'htpasswd'\?\)$"),
        ({}, "repositories: {alow: []}\n", r"unknown key 'alow' \(did you mean 'allow'\?\)$"),
    ],
)
def test_an_unknown_key_suggests_the_closest_one(
    tmp_path: Path, env: dict[str, str], file_text: str | None, message: str
) -> None:
    config = None
    if file_text is not None:
        config = tmp_path / "mirror.yaml"
        config.write_text(file_text)
    with pytest.raises(ConfigError, match=message):
        load({}, env=env, config_file=config)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("docker.io/library/Busybox", "lowercase"),
        ("acme/", "empty component"),
        ("acme//tool", "empty component"),
        ("/acme", "empty component"),
        ("busybox:1.36@sha256:" + "a" * 64, "a tag and a digest"),
        ("busybox@sha256:abc", "invalid sha256 digest"),
        ("busybox:bad tag", "is not a tag"),
        ("acme/too?", "not a name component"),
        ("quay.io/acme/*", "no upstream"),
    ],
)
def test_access_patterns_that_cannot_match_stop_the_start(
    tmp_path: Path, pattern: str, reason: str
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(f"repositories: {{deny: ['{pattern}']}}\n")
    with pytest.raises(ConfigError, match=reason) as raised:
        load({}, env={}, config_file=config)
    assert pattern in str(raised.value)
    assert "\n" not in str(raised.value)
    result = run_cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert pattern in result.stderr


def test_access_patterns_keep_their_reach() -> None:
    everything = AccessRules.parse(["*"], [])
    assert everything.permits("ghcr.io", "acme/tool")
    assert everything.permits(DOCKER_HUB, "acme/tool")
    hub = AccessRules.parse([], ["docker.io/*"])
    assert not hub.permits(DOCKER_HUB, "acme/private")
    assert not hub.permits(DOCKER_HUB, "library/busybox")
    assert hub.permits("ghcr.io", "acme/private")
    tagged = AccessRules.parse(["busybox:1.*"], [])
    assert tagged.permits(DOCKER_HUB, "library/busybox")  # its tags 1.*, not the rest
    assert not tagged.permits(DOCKER_HUB, "library/alpine")


def test_signature_policy_from_the_file(tmp_path: Path) -> None:
    key = tmp_path / "cosign.pub"
    key.write_bytes(public_pem(new_key()))
    config = tmp_path / "mirror.yaml"
    config.write_text(f"signatures: {{keys: [{key}], repositories: ['library/*', 'acme/*']}}\n")
    policy = load({}, env={}, config_file=config).signatures
    assert policy is not None
    assert policy.keys == (key,)
    assert [pin.text for pin in policy.repositories] == ["library/*", "acme/*"]
    assert load({}, env={}).signatures is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("signatures: {keys: [/nonexistent], repositories: ['*']}", "cannot read /nonexistent"),
        ("signatures: {keys: [KEY], repositories: []}", "repositories: a list of one or more"),
        ("signatures: {repositories: ['*']}", "keys: a list of one or more PEM"),
        ("signatures: {keys: [KEY], repos: ['*']}", "unknown key 'repos'"),
        ("signatures: {keys: [NOTAKEY], repositories: ['*']}", "holds no PEM public key"),
        ("signatures: {keys: [P384], repositories: ['*']}", "expected an ECDSA P-256 or RSA"),
    ],
)
def test_bad_signature_policies_say_why(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "key.pub").write_bytes(public_pem(new_key()))
    (tmp_path / "notakey.pub").write_text("hello\n")
    p384 = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "p384.pub").write_bytes(public_pem(p384))
    for name in ("NOTAKEY", "P384", "KEY"):
        text = text.replace(name, str(tmp_path / f"{name.lower()}.pub"))
    config = tmp_path / "mirror.yaml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"signatures in .*{message}"):
        load({}, env={}, config_file=config)
