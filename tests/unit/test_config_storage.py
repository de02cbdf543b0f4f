"""The ``storage: s3:`` settings, from the file and from MIRROR_STORAGE_S3_<KEY>."""

from pathlib import Path

import pytest

from mirror.config import ConfigError, load


def test_s3_settings_from_the_file_with_env_over_it(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("AKID\n")
    (tmp_path / "secret").write_text("SECRET\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "storage:\n  s3:\n    bucket: blobs\n    endpoint: http://127.0.0.1:8333/\n"
        f"    access_key_id_file: {tmp_path / 'id'}\n"
        f"    secret_access_key_file: {tmp_path / 'secret'}\n"
        "    redirect: true\n    redirect_expiry: 15m\n"
    )
    env = {"MIRROR_STORAGE_S3_PREFIX": "mirror/", "MIRROR_STORAGE_S3_REDIRECT": "false"}
    s3 = load({}, env=env, config_file=config).storage
    assert s3 is not None
    assert (s3.bucket, s3.endpoint, s3.prefix) == ("blobs", "http://127.0.0.1:8333", "mirror/")
    assert (s3.access_key_id, s3.secret_access_key) == ("AKID", "SECRET")
    assert (s3.redirect, s3.redirect_expiry, s3.path_style) == (False, 900.0, True)
    assert "SECRET" not in repr(s3)


def test_s3_from_the_environment_alone() -> None:
    s3 = load({}, env={"MIRROR_STORAGE_S3_BUCKET": "b"}).storage
    assert s3 is not None
    assert (s3.bucket, s3.endpoint, s3.path_style) == ("b", None, False)  # AWS: virtual hosts
    assert load({}, env={}).storage is None


@pytest.mark.parametrize(
    ("env", "file_text", "message"),
    [
        ({"MIRROR_STORAGE_S3_BUKET": "b"}, None, "did you mean MIRROR_STORAGE_S3_BUCKET"),
        ({"MIRROR_STORAGE_S3_ENDPOINT": "http://x"}, None, "s3.bucket: the bucket name"),
        ({}, "storage:\n  s3:\n    bucket: b\n    endpont: http://x\n", "did you mean 'endpoint'"),
        ({}, "storage:\n  gcs: {}\n", "unknown key 'gcs'"),
        ({}, "storage:\n  s3: {bucket: b, endpoint: ftp://x}\n", "s3.endpoint: expected"),
        ({}, "storage:\n  s3: {bucket: b, redirect_expiry: 30d}\n", "s3.redirect_expiry"),
        ({}, "storage:\n  s3: {bucket: b, access_key_id_file: /nonexistent}\n", "cannot read"),
        ({}, "storage:\n  s3: {bucket: b, ca_file: /nonexistent}\n", "s3.ca_file"),
        ({}, "storage:\n  s3: {bucket: b, local_cache_size: lots}\n", "s3.local_cache_size"),
    ],
)
def test_bad_s3_settings_name_the_key(
    tmp_path: Path, env: dict[str, str], file_text: str | None, message: str
) -> None:
    config = None
    if file_text is not None:
        config = tmp_path / "mirror.yaml"
        config.write_text(file_text)
    with pytest.raises(ConfigError, match=message) as raised:
        load({}, env=env, config_file=config)
    assert "\n" not in str(raised.value)
