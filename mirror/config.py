"""Frozen settings, loaded once with precedence flags > MIRROR_* environment > YAML file > defaults.

Every key has one name, spelled ``data_dir`` in the YAML file, ``MIRROR_DATA_DIR`` in the
environment and ``--data-dir`` on the command line. Upstream credentials are accepted from
the file and the environment only, so they never show up in a process listing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.reference import DOCKER_HUB

ENV_PREFIX = "MIRROR_"


class ConfigError(Exception):
    """A bad configuration; its message is one line that names the key."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    registry: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "0.0.0.0"  # a mirror serves a whole site by default
    listen_port: int = 5000
    data_dir: Path = Path("mirror-data")
    upstreams: Mapping[str, UpstreamSettings] = field(
        default_factory=lambda: {DOCKER_HUB: UpstreamSettings(DOCKER_HUB, DEFAULT_UPSTREAM)}
    )
    redis_url: str | None = None
    tag_ttl: float = 300.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    manifest_cache_size: int = 4096
    log_level: str = "info"
    log_format: str = "auto"


DEFAULT_UPSTREAM = "https://registry-1.docker.io"


def _url(value: Any) -> str:
    text = str(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    return text


def _listen(value: Any) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT")
    return host.strip("[]"), _port(port)


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("port out of range")
    return number


def _non_negative(value: Any) -> float:
    number = float(value)
    if number < 0 or math.isnan(number):
        raise ValueError("expected a number >= 0")
    return number


def _positive(value: Any) -> float:
    number = _non_negative(value)
    if number == 0:
        raise ValueError("expected a number > 0")
    return number


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or int(value) != float(value) or int(value) <= 0:
        raise ValueError("expected a whole number > 0")
    return int(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _redis_url(value: Any) -> str | None:
    text = _optional_str(value)
    if text is not None and urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return text


# key -> (parser, may it come from a command-line flag)
_KEYS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "listen": (_listen, True),
    "data_dir": (lambda v: Path(str(v)), True),
    "upstream": (_url, True),
    "upstream_username": (_optional_str, False),
    "upstream_password": (_optional_str, False),
    "redis_url": (_redis_url, True),
    "tag_ttl": (_non_negative, True),
    "connect_timeout": (_positive, True),
    "read_timeout": (_positive, True),
    "manifest_cache_size": (_positive_int, True),
    "log_level": (_choice("debug", "info", "warning", "error"), True),
    "log_format": (_choice("auto", "json", "console"), True),
}
FLAG_KEYS = tuple(key for key, (_, flag) in _KEYS.items() if flag)


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge the sources; ``flags`` holds only the flags the user actually gave."""
    env = os.environ if env is None else env
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(env[f"{ENV_PREFIX}CONFIG"])
    raw: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        for key, value in _read_file(config_file).items():
            raw[key] = (value, f"{key} in {config_file}")
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG":
            key = name.removeprefix(ENV_PREFIX).lower()
            if key not in _KEYS:
                raise ConfigError(f"unknown environment variable {name}")
            raw[key] = (value, name)
    for key, value in flags.items():
        if key not in FLAG_KEYS:
            raise ConfigError(f"unknown option --{key.replace('_', '-')}")
        raw[key] = (value, f"--{key.replace('_', '-')}")
    return _build(_parse_all(raw))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    for key in data:
        if key not in _KEYS:
            raise ConfigError(f"unknown key {key!r} in {path}")
    return data


def _parse_all(raw: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, (value, origin) in raw.items():
        parser, _ = _KEYS[key]
        try:
            parsed[key] = parser(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad value {value!r} for {origin}: {_one_line(exc)}") from None
    return parsed


def _build(values: Mapping[str, Any]) -> Settings:
    defaults = Settings()
    upstream = UpstreamSettings(
        registry=DOCKER_HUB,
        url=values.get("upstream", DEFAULT_UPSTREAM),
        username=values.get("upstream_username"),
        password=values.get("upstream_password"),
    )
    if (upstream.username is None) != (upstream.password is None):
        raise ConfigError("upstream_username and upstream_password must be given together")
    host, port = values.get("listen", (defaults.listen_host, defaults.listen_port))
    return Settings(
        listen_host=host,
        listen_port=port,
        data_dir=values.get("data_dir", defaults.data_dir),
        upstreams={DOCKER_HUB: upstream},
        redis_url=values.get("redis_url"),
        tag_ttl=values.get("tag_ttl", defaults.tag_ttl),
        connect_timeout=values.get("connect_timeout", defaults.connect_timeout),
        read_timeout=values.get("read_timeout", defaults.read_timeout),
        manifest_cache_size=values.get("manifest_cache_size", defaults.manifest_cache_size),
        log_level=values.get("log_level", defaults.log_level),
        log_format=values.get("log_format", defaults.log_format),
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
