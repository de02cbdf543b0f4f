"""What the mirror learned survives a restart: tags, manifests and blobs, with upstream gone."""

from tests.support.fakehub import FakeHub
from tests.support.mirror import FakeClock, RunningMirror
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, make_image, make_layer

ACCEPT = [OCI_INDEX, OCI_MANIFEST]


async def test_a_restarted_mirror_serves_its_cache_without_upstream(
    fake_hub: FakeHub, mirror: RunningMirror, clock: FakeClock
) -> None:
    layer = make_layer(b"persist" * 1000)
    image = make_image([layer])
    fake_hub.add_image("library/app", "1.0", image)
    await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
    await mirror.get(f"/v2/app/blobs/{layer.digest}")

    await mirror.restart()
    fake_hub.down = True
    fake_hub.clear_log()

    status, headers, body = await mirror.get("/v2/app/manifests/1.0", accept=ACCEPT)
    assert (status, body, headers["Docker-Content-Digest"]) == (200, image.manifest, image.digest)
    status, _, body = await mirror.get(f"/v2/app/manifests/{image.digest}", accept=ACCEPT)
    assert (status, body) == (200, image.manifest)
    status, _, body = await mirror.get(f"/v2/app/blobs/{layer.digest}")
    assert (status, body) == (200, layer.data)
    assert fake_hub.log == []


async def test_partial_files_left_by_a_crash_are_swept_at_start(
    fake_hub: FakeHub, mirror: RunningMirror
) -> None:
    layer = make_layer(b"x")
    fake_hub.add_image("library/app", "1.0", make_image([layer]))
    leftover = mirror.settings.data_dir / "blobs" / "sha256" / "ab" / ".ab12.deadbeef.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a blob")

    await mirror.restart()

    assert not leftover.exists()
