"""Artifacts that point at test images: cosign signatures, SBOMs, attestations.

Signatures are made in cosign's format with ``cryptography`` and a key the test makes: the
simple-signing payload is the layer, its signature (base64 of the DER ECDSA or PKCS#1 v1.5
RSA signature over the payload's SHA-256) the layer annotation cosign reads.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.support.oci import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Blob, Image, Index

EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
COSIGN_SIG_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SBOM_TYPE = "application/spdx+json"
ATTESTATION_TYPE = "application/vnd.in-toto+json"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


def descriptor(image: Image) -> dict[str, Any]:
    return {"mediaType": image.media_type, "digest": image.digest, "size": image.size}


def make_referrer(
    subject: Image,
    artifact_type: str,
    content: bytes,
    *,
    layer_type: str | None = None,
    annotations: dict[str, str] | None = None,
) -> Image:
    """An OCI 1.1 artifact manifest whose ``subject`` is ``subject``."""
    config = Blob(b"{}", EMPTY_TYPE)
    layer = Blob(content, layer_type or artifact_type)
    layer_descriptor = layer.descriptor()
    if annotations:
        layer_descriptor["annotations"] = annotations
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.descriptor(),
        "layers": [layer_descriptor],
        "subject": descriptor(subject),
        "annotations": {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"},
    }
    return Image(_dump(manifest), OCI_MANIFEST, config, [layer])


def referrers_index(referrers: list[Image]) -> bytes:
    """The image index of the referrers fallback tag (``sha256-<hex>``)."""
    manifests = []
    for image in referrers:
        entry = descriptor(image)
        entry["artifactType"] = json.loads(image.manifest)["artifactType"]
        manifests.append(entry)
    return _dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})


def new_key(kind: str = "ecdsa") -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def simple_signing_payload(reference: str, digest: str) -> bytes:
    document = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(document).encode()


def sign(key: PrivateKey, payload: bytes) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    else:
        raw = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(raw).decode()


def cosign_signature(key: PrivateKey, reference: str, subject: Image | Index) -> Image:
    """What ``cosign sign`` pushes as the ``sha256-<hex>.sig`` tag: a manifest whose layer is
    the payload, signed in its annotation."""
    payload = simple_signing_payload(reference, subject.digest)
    config = Blob(_dump({"architecture": "", "os": "", "rootfs": {"type": "layers"}}), OCI_CONFIG)
    layer = Blob(payload, SIMPLE_SIGNING)
    layer_descriptor = layer.descriptor()
    layer_descriptor["annotations"] = {SIGNATURE_ANNOTATION: sign(key, payload)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer_descriptor],
    }
    return Image(_dump(manifest), OCI_MANIFEST, config, [layer])


def cosign_referrer(key: PrivateKey, reference: str, subject: Image) -> Image:
    """The same signature as an OCI 1.1 referrer (``cosign sign --registry-referrers-mode``)."""
    payload = simple_signing_payload(reference, subject.digest)
    return make_referrer(
        subject,
        COSIGN_SIG_TYPE,
        payload,
        layer_type=SIMPLE_SIGNING,
        annotations={SIGNATURE_ANNOTATION: sign(key, payload)},
    )


def sig_tag(image: Image | Index, suffix: str = "sig") -> str:
    return image.digest.replace(":", "-") + f".{suffix}"
