"""The upstream token flow: realm from the challenge, tokens cached per scope, retried on expiry."""

import asyncio
from pathlib import Path

import pytest

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, MovingClock, RunningMirror, settings_for
from tests.support.oci import OCI_MANIFEST, make_image, make_layer

ACCEPT = [OCI_MANIFEST]


def token_requests(hub: FakeHub) -> int:
    return hub.count("GET", "token")


async def test_one_token_per_scope_is_reused(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    image = make_image([make_layer(b"a")])
    fake_hub.add_image("library/alpine", "latest", image)
    fake_hub.add_image("library/busybox", "latest", image)

    await asyncio.gather(*(mirror.get(f"/v2/alpine/manifests/{i}") for i in ("latest",) * 5))
    await mirror.get(f"/v2/alpine/blobs/{image.layers[0].digest}")
    await mirror.get(f"/v2/alpine/manifests/{image.digest}")
    assert token_requests(fake_hub) == 1
    [token] = fake_hub.requests("GET", "token")
    assert token.query["scope"] == ["repository:library/alpine:pull"]
    assert token.query["service"] == ["fake-registry"]

    await mirror.get("/v2/busybox/manifests/latest", accept=ACCEPT)
    assert token_requests(fake_hub) == 2  # another repository, another scope


async def test_an_expired_token_is_renewed(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.token_ttl = 1
    image = make_image([make_layer(b"e")])
    fake_hub.add_image("library/alpine", "latest", image)
    fake_hub.add_image("library/alpine", "other", make_image([make_layer(b"f")]))
    clock = MovingClock()

    async with RunningMirror(settings_for(fake_hub.url, tmp_path / "data"), clock=clock) as mirror:
        assert (await mirror.get("/v2/alpine/manifests/latest", accept=ACCEPT))[0] == 200
        clock.advance(1.1)  # past the token's lifetime, on the mirror and the upstream
        fake_hub.expire_tokens()
        status, _, _ = await mirror.get("/v2/alpine/manifests/other", accept=ACCEPT)

    assert status == 200
    assert token_requests(fake_hub) == 2


async def test_a_token_past_its_lifetime_on_the_mirror_clock_is_renewed(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    clock = MovingClock()
    for tag, content in (("latest", b"g"), ("other", b"h"), ("third", b"i")):
        fake_hub.add_image("library/alpine", tag, make_image([make_layer(content)]))
    settings = settings_for(fake_hub.url, tmp_path / "data", tag_ttl=300.0)
    async with RunningMirror(settings, clock=clock) as mirror:
        assert (await mirror.get("/v2/alpine/manifests/latest", accept=ACCEPT))[0] == 200
        assert (await mirror.get("/v2/alpine/manifests/other", accept=ACCEPT))[0] == 200
        assert token_requests(fake_hub) == 1
        clock.advance(fake_hub.token_ttl)  # no sleep: the token's lifetime passes at once
        assert (await mirror.get("/v2/alpine/manifests/third", accept=ACCEPT))[0] == 200
    assert token_requests(fake_hub) == 2


async def test_credentials_go_to_the_token_server_only(
    fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_hub.credentials = ("hubuser", "s3cret-pass")
    layer = make_layer(b"private")
    fake_hub.add_image("hubuser/private", "1.0", make_image([layer]))
    settings = settings_for(fake_hub.url, tmp_path, username="hubuser", password="s3cret-pass")

    async with RunningMirror(settings) as mirror:
        status, _, _ = await mirror.get("/v2/hubuser/private/manifests/1.0", accept=ACCEPT)
        assert status == 200
        status, _, body = await mirror.get(f"/v2/hubuser/private/blobs/{layer.digest}")
        assert (status, body) == (200, layer.data)

    [token] = fake_hub.requests("GET", "token")
    assert (token.header("Authorization") or "").startswith("Basic ")
    assert all(r.header("Authorization") is None for r in fake_hub.requests(server="cdn"))
    assert "s3cret-pass" not in capsys.readouterr().out
    assert "s3cret-pass" not in repr(settings)


async def test_wrong_credentials_are_a_clear_error(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.credentials = ("hubuser", "right")
    fake_hub.add_image("library/alpine", "latest", make_image([make_layer(b"w")]))
    settings = settings_for(fake_hub.url, tmp_path, username="hubuser", password="wrong")

    async with RunningMirror(settings) as mirror:
        status, _, body = await mirror.get("/v2/alpine/manifests/latest", accept=ACCEPT)

    assert status == 503
    assert b"token server refused" in body
