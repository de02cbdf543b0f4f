"""The domain errors of the mirror, each carrying its OCI error code and HTTP status.

Handlers and the resolver raise these; one middleware (``mirror.web.routes.middleware``)
turns them into the registry's JSON error body. Only ``mirror.upstream`` looks at
upstream status codes, and it translates them into this tree:

    RegistryError
    ├── NameInvalid          NAME_INVALID        400
    ├── TagInvalid           MANIFEST_INVALID    400
    ├── DigestInvalid        DIGEST_INVALID      400
    ├── Unsupported          UNSUPPORTED         405
    ├── NotFound             (generic 404)
    │   ├── NameUnknown      NAME_UNKNOWN        404
    │   ├── ManifestUnknown  MANIFEST_UNKNOWN    404
    │   └── BlobUnknown      BLOB_UNKNOWN        404
    ├── PaginationNumberInvalid  PAGINATION_NUMBER_INVALID  400
    ├── RangeInvalid         RANGE_INVALID       416
    ├── Unauthorized         UNAUTHORIZED        401
    ├── Denied               DENIED              403
    ├── TooManyRequests      TOOMANYREQUESTS     429
    ├── OutOfDescriptors     UNAVAILABLE         503 (the process has no file descriptor left)
    └── UpstreamError        UNAVAILABLE         503
        ├── IntegrityError   (upstream sent bytes that do not match their digest)
        └── Offline          (``serve --offline``: there is no upstream)   404
            ├── NameOffline      NAME_UNKNOWN
            ├── ManifestOffline  MANIFEST_UNKNOWN
            └── BlobOffline      BLOB_UNKNOWN

An ``Offline`` error is an upstream failure to the resolver, which then serves what it holds
as it does when an upstream is down, and a plain "not found" to the client.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RegistryError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "unknown error"

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400
    default_message = "invalid repository name"


class TagInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    status = 400
    default_message = "invalid tag"


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400
    default_message = "provided digest did not match uploaded content"


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405
    default_message = "the operation is unsupported: this registry is a read-only mirror"


class NotFound(RegistryError):
    code = "NOT_FOUND"
    status = 404
    default_message = "not found"


class NameUnknown(NotFound):
    code = "NAME_UNKNOWN"
    default_message = "repository name not known to registry"


class ManifestUnknown(NotFound):
    code = "MANIFEST_UNKNOWN"
    default_message = "manifest unknown"


class BlobUnknown(NotFound):
    code = "BLOB_UNKNOWN"
    default_message = "blob unknown to registry"


class PaginationNumberInvalid(RegistryError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400
    default_message = "invalid number of results requested"


class RangeInvalid(RegistryError):
    code = "RANGE_INVALID"
    status = 416
    default_message = "requested range not satisfiable"


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401
    default_message = "authentication required"


class Denied(RegistryError):
    code = "DENIED"
    status = 403
    default_message = "requested access to the resource is denied"


class TooManyRequests(RegistryError):
    code = "TOOMANYREQUESTS"
    status = 429
    default_message = "the upstream registry's rate limit is exhausted"


class OutOfDescriptors(RegistryError):
    code = "UNAVAILABLE"
    status = 503
    default_message = "the mirror is out of file descriptors; retry shortly"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class UpstreamError(RegistryError):
    code = "UNAVAILABLE"
    status = 503
    default_message = "the upstream registry is unavailable"


class IntegrityError(UpstreamError):
    default_message = "the upstream registry sent content that does not match its digest"


class Offline(UpstreamError):
    status = 404
    default_message = "the mirror is offline and does not hold this"


class NameOffline(Offline):
    code = "NAME_UNKNOWN"
    default_message = "repository not known: the mirror is offline and holds no tags for it"


class ManifestOffline(Offline):
    code = "MANIFEST_UNKNOWN"
    default_message = "manifest unknown: the mirror is offline and does not hold it"


class BlobOffline(Offline):
    code = "BLOB_UNKNOWN"
    default_message = "blob unknown: the mirror is offline and does not hold it"
