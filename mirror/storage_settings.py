"""The ``storage:`` settings: where blob bytes live when not in the data dir.

    storage:
      s3: {bucket: mirror, endpoint: http://seaweedfs:8333, ...}

Each key of ``s3`` is also read from ``MIRROR_STORAGE_S3_<KEY>`` (over the file's value, as
every environment variable is); the standard AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``) fill in what the settings
leave out, as every S3 tool reads them.
"""

from __future__ import annotations

import difflib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.domain.units import parse_bool, parse_duration, parse_size

S3_ENV_PREFIX = "MIRROR_STORAGE_S3_"
# Presigned URLs live at most a week (signature version 4's limit).
MAX_REDIRECT_EXPIRY = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class S3Settings:
    bucket: str
    endpoint: str | None = None  # None: AWS S3 (or AWS_ENDPOINT_URL)
    region: str | None = None  # None: AWS_REGION, else us-east-1
    prefix: str = ""
    path_style: bool = True  # the default only with an endpoint; AWS takes virtual hosts
    ca_file: Path | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    redirect: bool = False
    redirect_expiry: float = 600.0
    public_endpoint: str | None = None
    local_cache_size: int = 0


S3_KEYS = (
    "bucket",
    "endpoint",
    "region",
    "prefix",
    "path_style",
    "ca_file",
    "access_key_id_file",
    "secret_access_key_file",
    "redirect",
    "redirect_expiry",
    "public_endpoint",
    "local_cache_size",
)


def s3_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The ``MIRROR_STORAGE_S3_<KEY>`` variables, by key; ValueError names an unknown one."""
    found: dict[str, str] = {}
    for name, value in env.items():
        if name.startswith(S3_ENV_PREFIX):
            key = name.removeprefix(S3_ENV_PREFIX).lower()
            if key not in S3_KEYS:
                close = difflib.get_close_matches(key, S3_KEYS, n=1)
                hint = f" (did you mean {S3_ENV_PREFIX}{close[0].upper()}?)" if close else ""
                raise ValueError(f"unknown environment variable {name}{hint}")
            found[key] = value
    return found


def parse_storage(value: Any) -> S3Settings | None:
    """The ``storage:`` mapping; None (or no ``s3``): blobs in the data dir."""
    if value in (None, "", False):
        return None
    if not isinstance(value, dict):
        raise ValueError("expected {s3: {bucket: NAME, ...}}")
    unknown = sorted(set(value) - {"s3"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (the one storage besides disk is s3)")
    s3 = value.get("s3")
    if s3 in (None, "", False):
        return None
    if not isinstance(s3, dict):
        raise ValueError("s3: expected a mapping such as {bucket: mirror}")
    return _s3(s3)


def _s3(fields: Mapping[str, Any]) -> S3Settings:
    unknown = sorted(set(fields) - set(S3_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], S3_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown key {unknown[0]!r} under s3{hint}")
    bucket = str(fields.get("bucket") or "").strip()
    if not bucket:
        raise ValueError("s3.bucket: the bucket name is required")
    endpoint = _optional_url("endpoint", fields.get("endpoint"))
    prefix = str(fields.get("prefix") or "")
    if prefix.startswith("/"):
        raise ValueError("s3.prefix: a key prefix does not begin with /")
    access_key = _secret("access_key_id_file", fields.get("access_key_id_file"))
    secret_key = _secret("secret_access_key_file", fields.get("secret_access_key_file"))
    if (access_key is None) != (secret_key is None):
        raise ValueError("s3.access_key_id_file and s3.secret_access_key_file go together")
    expiry = _field("redirect_expiry", parse_duration, fields.get("redirect_expiry", "10m"))
    if not 1 <= expiry <= MAX_REDIRECT_EXPIRY:
        raise ValueError("s3.redirect_expiry: between 1s and 7d (presigned URLs' limit)")
    return S3Settings(
        bucket=bucket,
        endpoint=endpoint,
        region=_optional_text(fields.get("region")),
        prefix=prefix,
        path_style=_field("path_style", parse_bool, fields.get("path_style", endpoint is not None)),
        ca_file=_ca_file(fields.get("ca_file")),
        access_key_id=access_key,
        secret_access_key=secret_key,
        redirect=_field("redirect", parse_bool, fields.get("redirect", False)),
        redirect_expiry=expiry,
        public_endpoint=_optional_url("public_endpoint", fields.get("public_endpoint")),
        local_cache_size=_field("local_cache_size", parse_size, fields.get("local_cache_size", 0)),
    )


def _field(name: str, parse: Any, value: Any) -> Any:
    try:
        return parse(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"s3.{name}: {exc}") from None


def _optional_text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _optional_url(name: str, value: Any) -> str | None:
    text = _optional_text(value)
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"s3.{name}: expected an http:// or https:// URL")
    return text.rstrip("/")


def _secret(name: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    path = Path(str(value))
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"s3.{name}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"s3.{name}: {path} is empty")
    return secret


def _ca_file(value: Any) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(str(value))
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError):
        raise ValueError(f"s3.ca_file: {path} is no readable PEM CA certificate") from None
    return path
