"""cosign's signature format, read and checked (mirror.domain.cosign)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mirror.domain.cosign import load_public_key, payload_names, signatures_in, signed_by
from tests.support.artifacts import (
    cosign_signature,
    new_key,
    public_pem,
    sign,
    simple_signing_payload,
)
from tests.support.oci import make_image, make_layer

DIGEST = "sha256:" + "ab" * 32


def _key_file(tmp_path: Path, data: bytes, name: str = "cosign.pub") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_a_signature_verifies_only_with_its_own_key_and_payload(
    tmp_path: Path, kind: str
) -> None:
    key, other = new_key(kind), new_key(kind)
    trusted = load_public_key(_key_file(tmp_path, public_pem(key)))
    stranger = load_public_key(_key_file(tmp_path, public_pem(other), "other.pub"))
    payload = simple_signing_payload("docker.io/library/app", DIGEST)
    signature = base64.b64decode(sign(key, payload))
    assert signed_by([stranger, trusted], signature, payload) == trusted
    assert signed_by([stranger], signature, payload) is None
    assert signed_by([trusted], signature, payload + b" ") is None
    assert signed_by([trusted], b"not a signature", payload) is None


def test_an_rsa_pss_signature_verifies(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    trusted = load_public_key(_key_file(tmp_path, public_pem(key)))
    payload = simple_signing_payload("docker.io/library/app", DIGEST)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH)
    assert signed_by([trusted], key.sign(payload, pss, hashes.SHA256()), payload) == trusted


def test_a_payload_names_one_digest_and_says_what_it_is() -> None:
    payload = simple_signing_payload("docker.io/library/app", DIGEST)
    assert payload_names(payload, DIGEST)
    assert not payload_names(payload, "sha256:" + "cd" * 32)
    document = json.loads(payload)
    document["critical"]["type"] = "something else"
    assert not payload_names(json.dumps(document).encode(), DIGEST)
    for broken in (b"not json", b"[]", b'{"critical": null}', b'{"critical": {"image": 1}}'):
        assert not payload_names(broken, DIGEST)


def test_signature_layers_are_read_and_the_rest_ignored() -> None:
    image = make_image([make_layer(b"signed")])
    signature = cosign_signature(new_key(), "docker.io/library/app", image)
    found = signatures_in(signature.manifest)
    assert [s.payload_digest for s in found] == [signature.layers[0].digest]
    assert signatures_in(image.manifest) == []  # an image: no signature layers
    for body in (b"not json", b"[]", b'{"layers": "x"}', b'{"layers": [1, {"mediaType": 2}]}'):
        assert signatures_in(body) == []
    document = json.loads(signature.manifest)
    document["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"] = "not base64!"
    assert signatures_in(json.dumps(document).encode()) == []
