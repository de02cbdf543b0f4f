"""HTTPS on the listen address: TLS 1.2 or newer, with certificates that can be replaced on
disk (cert-manager, certbot) and are picked up without a restart.

The files are checked every few seconds; when either changed (content, size, or the file a
symlink points to), the pair is loaded again into the same context, which every new
connection uses. A pair that does not load (caught half-written, or a key that does not
match) is logged and the previous one stays in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

RELOAD_INTERVAL = 2.0

Stamp = tuple[tuple[int, int, int], ...]


class CertificateError(Exception):
    """The certificate or key cannot be used: one line for the user."""


class ServerTLS:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._stamps()
        try:
            self.context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            why = _file_at_fault(cert, key, exc)
            raise CertificateError(f"cannot use {cert} with {key}: {why}") from None

    async def watch(self, interval: float = RELOAD_INTERVAL) -> None:
        """Load the pair again whenever it changes on disk; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(OSError):
                stamp = await asyncio.to_thread(self._stamps)
                if stamp != self._stamp:
                    await asyncio.to_thread(self._reload, stamp)

    def _reload(self, stamp: Stamp) -> None:
        try:
            self.context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            # Perhaps caught mid-write: the next look tries again, the old pair serves.
            log.warning("tls_reload_failed", cert=str(self.cert), error=_reason(exc))
            return
        self._stamp = stamp
        log.info("tls_certificate_reloaded", cert=str(self.cert))

    def _stamps(self) -> Stamp:
        stamps = []
        for path in (self.cert, self.key):
            info = os.stat(path)
            stamps.append((info.st_ino, info.st_mtime_ns, info.st_size))
        return tuple(stamps)


_CERTIFICATE_PEM = b"-----BEGIN CERTIFICATE-----"
_KEY_PEM = b"PRIVATE KEY-----"


def _file_at_fault(cert: Path, key: Path, exc: BaseException) -> str:
    """Why a pair does not load, naming the file to fix: OpenSSL's "PEM lib" does not."""
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError:
        return _reason(exc)
    fault = _not_a_certificate(cert, cert_pem, key_pem) or _not_a_key(key, key_pem)
    if fault is not None:
        return fault
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key} is not the key of the certificate in {cert}"
    return _reason(exc)


def _not_a_certificate(cert: Path, cert_pem: bytes, key_pem: bytes) -> str | None:
    if _CERTIFICATE_PEM in cert_pem:
        return None
    if _KEY_PEM not in cert_pem:
        return f"{cert} holds no PEM certificate"
    swapped = _CERTIFICATE_PEM in key_pem and _KEY_PEM not in key_pem
    return f"{cert} is a private key, not a certificate" + (
        " (tls_cert and tls_key swapped?)" if swapped else ""
    )


def _not_a_key(key: Path, key_pem: bytes) -> str | None:
    if _KEY_PEM in key_pem:
        return None
    if _CERTIFICATE_PEM in key_pem:
        return f"{key} is a certificate, not a private key"
    return f"{key} holds no PEM private key"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
