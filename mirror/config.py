"""Frozen settings, loaded once with precedence flags > MIRROR_* environment > YAML file > defaults.

Every key has one name, spelled ``data_dir`` in the YAML file, ``MIRROR_DATA_DIR`` in the
environment and ``--data-dir`` on the command line. Upstream credentials are accepted from
the file and the environment only, so they never show up in a process listing.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.content.redis_client import TLS_SCHEMES, check_url, masked_url
from mirror.domain.cosign import load_public_key
from mirror.domain.pins import Pin
from mirror.domain.reference import DOCKER_HUB
from mirror.domain.rules import AccessRules
from mirror.domain.units import (
    SizeOrShare,
    parse_bool,
    parse_duration,
    parse_rate,
    parse_size,
    parse_size_or_percent,
)
from mirror.storage_settings import S3_ENV_PREFIX, S3Settings, parse_storage, s3_environment

ENV_PREFIX = "MIRROR_"
# What Kubernetes puts in every pod for a Service named "mirror" (service links):
# MIRROR_SERVICE_HOST, MIRROR_SERVICE_PORT[_NAME], MIRROR_PORT, MIRROR_PORT_5000_TCP[_ADDR|...].
_SERVICE_LINK_RE = re.compile(
    r"MIRROR_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)"
    r"(?:_(?:ADDR|PORT|PROTO))?)?)"
)


class ConfigError(Exception):
    """A bad configuration; its message is one line that names the key."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    registry: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # Trusted besides the system CAs, for the registry, its token realm and its CDN.
    ca_file: Path | None = None
    insecure: bool = False  # no certificate check at all (labs); logged loudly at start


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Client logins: HTTP Basic against an htpasswd file of bcrypt entries."""

    htpasswd: Path
    metrics: bool = False  # /metrics behind the same logins
    realm: str = "mirror"


@dataclass(frozen=True, slots=True)
class SignatureSettings:
    """The signature policy: in ``repositories``, only images cosign-signed by one of
    ``keys`` (PEM public key files) are served."""

    keys: tuple[Path, ...]
    repositories: tuple[Pin, ...]


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "0.0.0.0"  # a mirror serves a whole site by default
    listen_port: int = 5000
    data_dir: Path = Path("mirror-data")
    upstreams: Mapping[str, UpstreamSettings] = field(
        default_factory=lambda: {DOCKER_HUB: UpstreamSettings(DOCKER_HUB, DEFAULT_UPSTREAM)}
    )
    redis_url: str | None = None
    # Trusted besides the system CAs, for a rediss:// (or rediss+sentinel://) Redis.
    redis_ca_file: Path | None = None
    tag_ttl: float = 300.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # Manifest, token, tag-list and blob-HEAD requests, and a blob GET's headers, end by then.
    request_timeout: float = 10.0
    manifest_cache_size: int = 4096
    manifest_cache_bytes: int = 64 * 1024 * 1024
    max_stale: float | None = None
    negative_ttl: float = 30.0
    # Upstream lookups of tags and digests never seen, per second per upstream (0: no bound).
    cold_lookup_rate: float = 10.0
    ratelimit_reserve: int = 0
    workers: int = 1
    log_level: str = "info"
    log_format: str = "auto"
    # The disk budget: blobs beyond it are evicted, least recently pulled first.
    max_cache_size: int | None = None
    min_free_space: SizeOrShare = field(default_factory=lambda: SizeOrShare(percent=5.0))
    evict_unused_after: float | None = None
    pins: tuple[Pin, ...] = ()
    # Air-gapped: no upstream is ever contacted; what is held is served whatever its age.
    offline: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth: AuthSettings | None = None
    repositories: AccessRules = field(default_factory=AccessRules)
    # Cache misses costing an upstream manifest GET, per client address a second (0: off).
    client_miss_limit: float = 0.0
    # Blob transfers one client address may have under way at once.
    client_max_transfers: int = 64
    # Seconds a download may go without the client accepting a byte before it is ended.
    send_timeout: float = 60.0
    # auto: uvloop when it is installed; uvloop or asyncio to choose.
    event_loop: str = "auto"
    signatures: SignatureSettings | None = None
    # On SIGTERM: seconds /readyz says 503 while the port still accepts (load balancers
    # notice late), then seconds transfers in flight may take to finish.
    shutdown_delay: float = 5.0
    shutdown_grace: float = 30.0
    # Blobs in S3-compatible object storage rather than in data_dir (mirror.storage_settings).
    storage: S3Settings | None = None


DEFAULT_UPSTREAM = "https://registry-1.docker.io"


def _did_you_mean(name: str, known: Iterable[str], *, quote: bool = True) -> str:
    """`` (did you mean 'tag_ttl'?)`` for a misspelt name, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if not close:
        return ""
    return f" (did you mean {close[0]!r}?)" if quote else f" (did you mean {close[0]}?)"


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


def _optional_seconds(value: Any) -> float | None:
    return None if value in (None, "", "none", "unlimited") else _non_negative(value)


def _optional_size(value: Any) -> int | None:
    return None if value in (None, "", "none", "unlimited") else parse_size(value)


def _optional_duration(value: Any) -> float | None:
    if value is False:  # YAML reads a bare `off` as false
        return None
    return None if value in (None, "", "none", "off") else parse_duration(value)


def _pins(value: Any) -> tuple[Pin, ...]:
    return tuple(Pin.parse(item) for item in _items(value))


def _items(value: Any) -> list[str]:
    """A list of image patterns (YAML, repeated --pin) or one comma-separated string (env)."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item) for item in items if str(item).strip()]


def _count(value: Any) -> int:
    if isinstance(value, bool) or int(value) != float(value) or int(value) < 0:
        raise ValueError("expected a whole number >= 0")
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
    if text is not None:
        check_url(text)
    return text


_REGISTRY_RE = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]+)?")


def _registry(name: str) -> str:
    name = name.strip().lower()
    if _REGISTRY_RE.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a registry host name")
    return name


def _upstream(value: Any) -> dict[str, str]:
    """``URL`` (Docker Hub's upstream) or ``NAME=URL``; several, as a list or comma-separated."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    upstreams: dict[str, str] = {}
    for item in (str(i).strip() for i in items):
        name, sep, url = item.partition("=")
        if not sep:
            name, url = DOCKER_HUB, item
        upstreams[_registry(name)] = _url(url)
    return upstreams


def _upstreams(value: Any) -> dict[str, UpstreamSettings]:
    """The ``upstreams:`` mapping: registry name -> URL, or -> {url, username, password}."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of registry names to URLs")
    result: dict[str, UpstreamSettings] = {}
    for name, entry in value.items():
        fields = entry if isinstance(entry, dict) else {"url": entry}
        keys = {"url", "username", "password", "password_file", "ca_file", "insecure"}
        unknown = sorted(set(fields) - keys)
        if unknown:
            raise ValueError(
                f"unknown key {unknown[0]!r} under {name!r}{_did_you_mean(unknown[0], keys)}"
            )
        registry = _registry(str(name))
        password = _optional_str(fields.get("password"))
        if fields.get("password_file") is not None:
            if password is not None:
                raise ValueError(f"password and password_file under {name!r}: give one")
            password = read_secret(fields["password_file"])
        settings = _upstream_settings(
            registry,
            _url(fields.get("url", DEFAULT_UPSTREAM if registry == DOCKER_HUB else None)),
            _optional_str(fields.get("username")),
            password,
        )
        result[registry] = replace(
            settings,
            ca_file=_ca_file(fields["ca_file"]) if fields.get("ca_file") else None,
            insecure=parse_bool(fields.get("insecure", False)),
        )
    return result


def read_secret(value: Any) -> str:
    """A password kept in a file (a mounted Kubernetes Secret): its content, stripped."""
    path = Path(str(value))
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def _readable_file(value: Any) -> Path:
    path = Path(str(value))
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


def _ca_file(value: Any) -> Path:
    path = _readable_file(value)
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise ValueError(f"{path} holds no PEM CA certificate") from None
    return path


def _optional_file(value: Any) -> Path | None:
    return None if value in (None, "") else _readable_file(value)


def _auth(value: Any) -> AuthSettings | None:
    if value in (None, False, ""):
        return None
    if not isinstance(value, dict):
        raise ValueError("expected a mapping such as {htpasswd: /etc/mirror/htpasswd}")
    keys = {"htpasswd", "metrics", "realm"}
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}{_did_you_mean(unknown[0], keys)}")
    if not value.get("htpasswd"):
        raise ValueError("htpasswd: the password file is required")
    return AuthSettings(
        _readable_file(value["htpasswd"]),
        metrics=parse_bool(value.get("metrics", False)),
        realm=str(value.get("realm", "mirror")).replace('"', ""),
    )


def _access_rules(value: Any) -> AccessRules:
    if value in (None, ""):
        return AccessRules()
    if not isinstance(value, dict):
        raise ValueError("expected {allow: [PATTERN ...], deny: [PATTERN ...]}")
    keys = {"allow", "deny"}
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}{_did_you_mean(unknown[0], keys)}")
    return AccessRules.parse(_items(value.get("allow") or ()), _items(value.get("deny") or ()))


def _signatures(value: Any) -> SignatureSettings | None:
    if value in (None, ""):
        return None
    if not isinstance(value, dict):
        raise ValueError("expected {keys: [FILE ...], repositories: [PATTERN ...]}")
    keys = {"keys", "repositories"}
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}{_did_you_mean(unknown[0], keys)}")
    files, patterns = value.get("keys"), value.get("repositories")
    if not isinstance(files, list) or not files:
        raise ValueError("keys: a list of one or more PEM public key files is required")
    if not isinstance(patterns, list) or not patterns:
        raise ValueError("repositories: a list of one or more patterns is required")
    paths = tuple(Path(str(file)) for file in files)
    for path in paths:
        load_public_key(path)  # refused now, with the reason, rather than at the first pull
    return SignatureSettings(paths, _pins(patterns))


def _upstream_settings(
    registry: str, url: str, username: str | None, password: str | None
) -> UpstreamSettings:
    if (username is None) != (password is None):
        raise ConfigError(f"username and password for {registry} must be given together")
    return UpstreamSettings(registry, url, username, password)


@dataclass(frozen=True, slots=True)
class _Key:
    parse: Callable[[Any], Any]
    flag: bool = True  # credentials never come from flags: they would show in `ps`
    env: bool = True


_KEYS: dict[str, _Key] = {
    "listen": _Key(_listen),
    "data_dir": _Key(lambda v: Path(str(v))),
    "upstream": _Key(_upstream),
    "upstreams": _Key(_upstreams, flag=False, env=False),
    "upstream_username": _Key(_optional_str, flag=False),
    "upstream_password": _Key(_optional_str, flag=False),
    "redis_url": _Key(_redis_url),
    "redis_ca_file": _Key(lambda v: None if v in (None, "") else _ca_file(v)),
    "tag_ttl": _Key(_non_negative),
    "connect_timeout": _Key(_positive),
    "read_timeout": _Key(_positive),
    "request_timeout": _Key(_positive),
    "manifest_cache_size": _Key(_positive_int),
    "manifest_cache_bytes": _Key(parse_size),
    "max_stale": _Key(_optional_seconds),
    "negative_ttl": _Key(_non_negative),
    "cold_lookup_rate": _Key(parse_rate),
    "ratelimit_reserve": _Key(_count),
    "workers": _Key(_positive_int),
    "log_level": _Key(_choice("debug", "info", "warning", "error")),
    "log_format": _Key(_choice("auto", "json", "console")),
    "max_cache_size": _Key(_optional_size),
    "min_free_space": _Key(parse_size_or_percent),
    "evict_unused_after": _Key(_optional_duration),
    "pins": _Key(_pins),
    "offline": _Key(parse_bool),
    "tls_cert": _Key(_optional_file),
    "tls_key": _Key(_optional_file),
    "auth": _Key(_auth, flag=False, env=False),
    "repositories": _Key(_access_rules, flag=False, env=False),
    "upstream_password_file": _Key(read_secret, flag=False),
    "client_miss_limit": _Key(parse_rate),
    "client_max_transfers": _Key(_positive_int),
    "send_timeout": _Key(_positive),
    "event_loop": _Key(_choice("auto", "uvloop", "asyncio")),
    "signatures": _Key(_signatures, flag=False, env=False),
    "shutdown_delay": _Key(parse_duration),
    "shutdown_grace": _Key(parse_duration),
    # Nested: each s3 key as MIRROR_STORAGE_S3_<KEY> (read in load()).
    "storage": _Key(parse_storage, flag=False, env=False),
}
FLAG_KEYS = tuple(key for key, spec in _KEYS.items() if spec.flag)


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Merge the sources; ``flags`` holds only the flags the user actually gave."""
    env = os.environ if env is None else env
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(env[f"{ENV_PREFIX}CONFIG"])
    sources: list[dict[str, tuple[Any, str]]] = []
    if config_file is not None:
        sources.append(
            {
                key: (value, f"{key} in {config_file}")
                for key, value in _read_file(config_file).items()
            }
        )
    from_env = _storage_from_env(env, sources[0] if sources else {})
    for name, value in env.items():
        if name.startswith(S3_ENV_PREFIX):
            continue
        if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG":
            key = name.removeprefix(ENV_PREFIX).lower()
            if key not in _KEYS and _SERVICE_LINK_RE.fullmatch(name):
                continue  # Kubernetes' own variables for a Service named "mirror"
            if key not in _KEYS or not _KEYS[key].env:
                variables = (f"{ENV_PREFIX}{k.upper()}" for k, spec in _KEYS.items() if spec.env)
                hint = _did_you_mean(name, variables, quote=False)
                raise ConfigError(f"unknown environment variable {name}{hint}")
            from_env[key] = (value, name)
    sources.append(from_env)
    from_flags: dict[str, tuple[Any, str]] = {}
    for key, value in flags.items():
        if key not in FLAG_KEYS:
            raise ConfigError(f"unknown option --{key.replace('_', '-')}")
        from_flags[key] = (value, f"--{key.replace('_', '-')}")
    sources.append(from_flags)
    merged: dict[str, Any] = {}
    for source in sources:
        for key, value in _parse_all(source).items():
            # Upstreams merge by registry name: a flag for ghcr.io keeps the file's docker.io.
            merged[key] = {**merged.get(key, {}), **value} if key == "upstream" else value
    return _build(merged)


def _storage_from_env(
    env: Mapping[str, str], from_file: Mapping[str, tuple[Any, str]]
) -> dict[str, tuple[Any, str]]:
    """``storage`` from the MIRROR_STORAGE_S3_<KEY> variables, each over the file's key."""
    try:
        s3_env = s3_environment(env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not s3_env:
        return {}
    in_file = from_file.get("storage", ({}, ""))[0]
    s3_file = in_file.get("s3") if isinstance(in_file, dict) else None
    merged = {**(s3_file if isinstance(s3_file, dict) else {}), **s3_env}
    return {"storage": ({"s3": merged}, f"{S3_ENV_PREFIX}*")}


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
            raise ConfigError(f"unknown key {key!r} in {path}{_did_you_mean(str(key), _KEYS)}")
    return data


def _parse_all(raw: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, (value, origin) in raw.items():
        try:
            parsed[key] = _KEYS[key].parse(value)
        except (TypeError, ValueError) as exc:
            if key == "storage":  # a whole mapping: the message names the key within it
                raise ConfigError(f"{origin}: {_one_line(exc)}") from None
            shown = masked_url(str(value)) if key == "redis_url" else value
            raise ConfigError(f"bad value {shown!r} for {origin}: {_one_line(exc)}") from None
    return parsed


def _build(values: Mapping[str, Any]) -> Settings:
    defaults = Settings()
    upstreams = dict(defaults.upstreams)
    upstreams.update(values.get("upstreams", {}))
    for registry, url in values.get("upstream", {}).items():
        known = upstreams.get(registry)
        upstreams[registry] = (
            replace(known, url=url) if known is not None else UpstreamSettings(registry, url)
        )
    if "upstream_password" in values and "upstream_password_file" in values:
        raise ConfigError("upstream_password and upstream_password_file: give one")
    password = values.get("upstream_password", values.get("upstream_password_file"))
    if "upstream_username" in values or password is not None:
        hub = upstreams[DOCKER_HUB]
        upstreams[DOCKER_HUB] = replace(
            _upstream_settings(DOCKER_HUB, hub.url, values.get("upstream_username"), password),
            ca_file=hub.ca_file,
            insecure=hub.insecure,
        )
    rules: AccessRules = values.get("repositories", defaults.repositories)
    unmatched = rules.unknown_registries(list(upstreams))
    if unmatched:
        raise ConfigError(
            f"repositories: pattern {unmatched[0]!r} names a registry that is no upstream"
        )
    redis_scheme = urlsplit(values.get("redis_url") or "").scheme
    if values.get("redis_ca_file") is not None and redis_scheme not in TLS_SCHEMES:
        raise ConfigError("redis_ca_file needs a rediss:// or rediss+sentinel:// redis_url")
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ConfigError("tls_cert and tls_key must be given together")
    host, port = values.get("listen", (defaults.listen_host, defaults.listen_port))
    return Settings(
        listen_host=host,
        listen_port=port,
        data_dir=values.get("data_dir", defaults.data_dir),
        upstreams=upstreams,
        redis_url=values.get("redis_url"),
        redis_ca_file=values.get("redis_ca_file"),
        tag_ttl=values.get("tag_ttl", defaults.tag_ttl),
        connect_timeout=values.get("connect_timeout", defaults.connect_timeout),
        read_timeout=values.get("read_timeout", defaults.read_timeout),
        request_timeout=values.get("request_timeout", defaults.request_timeout),
        manifest_cache_size=values.get("manifest_cache_size", defaults.manifest_cache_size),
        manifest_cache_bytes=values.get("manifest_cache_bytes", defaults.manifest_cache_bytes),
        max_stale=values.get("max_stale", defaults.max_stale),
        negative_ttl=values.get("negative_ttl", defaults.negative_ttl),
        cold_lookup_rate=values.get("cold_lookup_rate", defaults.cold_lookup_rate),
        ratelimit_reserve=values.get("ratelimit_reserve", defaults.ratelimit_reserve),
        workers=values.get("workers", defaults.workers),
        log_level=values.get("log_level", defaults.log_level),
        log_format=values.get("log_format", defaults.log_format),
        max_cache_size=values.get("max_cache_size", defaults.max_cache_size),
        min_free_space=values.get("min_free_space", defaults.min_free_space),
        evict_unused_after=values.get("evict_unused_after", defaults.evict_unused_after),
        pins=values.get("pins", defaults.pins),
        offline=values.get("offline", defaults.offline),
        tls_cert=values.get("tls_cert"),
        tls_key=values.get("tls_key"),
        auth=values.get("auth"),
        repositories=rules,
        client_miss_limit=values.get("client_miss_limit", defaults.client_miss_limit),
        client_max_transfers=values.get("client_max_transfers", defaults.client_max_transfers),
        send_timeout=values.get("send_timeout", defaults.send_timeout),
        event_loop=values.get("event_loop", defaults.event_loop),
        signatures=values.get("signatures"),
        shutdown_delay=values.get("shutdown_delay", defaults.shutdown_delay),
        shutdown_grace=values.get("shutdown_grace", defaults.shutdown_grace),
        storage=values.get("storage"),
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
