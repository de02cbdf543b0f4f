"""cosign's signature format, read and checked: pure code, no I/O beyond reading a key file.

    sha256-<hex>.sig tag, or an OCI 1.1 referrer of artifactType COSIGN_SIG_TYPE
        └── layer (SIMPLE_SIGNING): the payload, a JSON document naming the manifest digest
              annotation dev.cosignproject.cosign/signature: base64 of the signature over
              the payload's bytes (ECDSA P-256 with SHA-256, DER; or RSA PKCS#1 v1.5 / PSS
              with SHA-256)

Only key-based signatures are read; keyless ones (Fulcio certificates, Rekor bundles) are
not, so a policy naming keys never passes an image on a keyless signature.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

COSIGN_SIG_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
# A payload is a few hundred bytes; anything much larger is not one.
MAX_PAYLOAD = 64 * 1024
MIN_RSA_BITS = 2048

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class TrustedKey:
    path: Path
    key: PublicKey


def load_public_key(path: Path) -> TrustedKey:
    """A PEM public key cosign signs with (``cosign.pub``): ECDSA P-256 or RSA; a
    ValueError saying why otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path} holds no PEM public key") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return TrustedKey(path, key)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return TrustedKey(path, key)
    raise ValueError(f"{path}: expected an ECDSA P-256 or RSA (2048 bits or more) public key")


@dataclass(frozen=True, slots=True)
class Signature:
    """A signature layer of a signature manifest: its payload blob and the signature."""

    payload_digest: str
    payload_size: int | None
    signature: bytes


def signatures_in(manifest_body: bytes) -> list[Signature]:
    """The cosign signatures a manifest carries (none when it is not a signature manifest)."""
    try:
        document = json.loads(manifest_body)
    except ValueError:
        return []
    layers = document.get("layers") if isinstance(document, dict) else None
    if not isinstance(layers, list):
        return []
    found = []
    for layer in layers:
        signature = _signature(layer)
        if signature is not None:
            found.append(signature)
    return found


def _signature(layer: Any) -> Signature | None:
    if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
        return None
    annotations = layer.get("annotations")
    encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
    digest, size = layer.get("digest"), layer.get("size")
    if not isinstance(encoded, str) or not isinstance(digest, str):
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return Signature(digest, size if isinstance(size, int) else None, raw)


def signed_by(keys: list[TrustedKey], signature: bytes, payload: bytes) -> TrustedKey | None:
    """The key among ``keys`` that made ``signature`` over ``payload``, if any."""
    for trusted in keys:
        if _verifies(trusted.key, signature, payload):
            return trusted
    return None


def _verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            return True
        for scheme in (
            padding.PKCS1v15(),
            padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO),
        ):
            try:
                key.verify(signature, payload, scheme, hashes.SHA256())
                return True
            except InvalidSignature:
                continue
    except (InvalidSignature, ValueError):
        return False
    return False


def payload_names(payload: bytes, digest: str) -> bool:
    """Does a simple-signing payload say it signs the manifest ``digest``? (Its
    ``docker-reference`` is not read: a mirror serves images under names of its own.)"""
    try:
        document = json.loads(payload)
        critical = document["critical"]
        named = critical["image"]["docker-manifest-digest"]
        kind = critical["type"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(kind == PAYLOAD_TYPE and named == digest)
