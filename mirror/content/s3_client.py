"""The aiobotocore client of object storage: how it is configured (timeouts, retries,
addressing, credentials), how its failures read in one line, and how its calls are counted."""

from __future__ import annotations

import os
import time
from typing import Any

from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import ClientError

from mirror.metrics import Metrics
from mirror.storage_settings import S3Settings

# How long a blocking call waits for the bucket before it counts as down.
CALL_TIMEOUT = 60.0


def client_options(
    settings: S3Settings, *, connect_timeout: float, read_timeout: float
) -> dict[str, Any]:
    """What ``create_client("s3", ...)`` is given, besides the endpoint."""
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # Standard mode retries 503 SlowDown and throttling with backoff and jitter.
        retries={"max_attempts": 4, "mode": "standard"},
        s3={"addressing_style": "path" if settings.path_style else "virtual"},
        signature_version="s3v4",
        # Ceph RGW, GCS and older MinIO refuse the CRC checksums botocore adds by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=64,
    )
    region = (
        settings.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    options: dict[str, Any] = {"region_name": region, "config": config}
    if settings.ca_file is not None:
        options["verify"] = str(settings.ca_file)
    if settings.access_key_id is not None:
        options["aws_access_key_id"] = settings.access_key_id
        options["aws_secret_access_key"] = settings.secret_access_key
    return options


def describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{error.get('Code', 'error')} ({status}): {error.get('Message', '')}".strip()
    return " ".join(str(exc).split()) or type(exc).__name__


def missing(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def count_requests(client: Any, metrics: Metrics) -> None:
    """Count every request to the bucket and time it, by operation and result (botocore's
    events: retries of one call count once, with the call's final result)."""

    def started(model: Any, context: dict[str, Any], **_: Any) -> None:
        context["mirror_started"] = time.monotonic()
        context["mirror_operation"] = model.name

    def answered(model: Any, http_response: Any, context: dict[str, Any], **_: Any) -> None:
        status = int(http_response.status_code)
        result = (
            "ok" if status < 300
            else "not_found" if status == 404
            else "refused" if status < 500
            else "failed"
        )  # fmt: skip
        _count(model.name, result, context)

    def unreachable(context: dict[str, Any], **_: Any) -> None:
        _count(context.get("mirror_operation", "unknown"), "unreachable", context)

    def _count(operation: str, result: str, context: dict[str, Any]) -> None:
        op = xform_name(operation)
        metrics.storage_requests.labels(op, result).inc()
        began = context.get("mirror_started")
        if began is not None:
            metrics.storage_duration.labels(op).observe(time.monotonic() - began)

    events = client.meta.events
    events.register("before-call.s3", started)
    events.register("after-call.s3", answered)
    events.register("after-call-error.s3", unreachable)
