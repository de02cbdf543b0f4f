"""What reading a layout may cost: bounds set small, so a test needs no large file."""

from pathlib import Path

import pytest

from mirror.services.layout import Bounds, LayoutError, members
from tests.support.bundles import RawTar


def test_the_number_of_tar_entries_is_bounded(tmp_path: Path) -> None:
    tar = RawTar(tmp_path / "many.tar")
    for number in range(101):
        tar.header(f"e{number}", 0)
    tar.close()
    assert len(list(members(tar.path, Bounds(members=101)))) == 101
    with pytest.raises(LayoutError, match=r"many\.tar: more than 100 tar entries"):
        list(members(tar.path, Bounds(members=100)))


def test_extension_headers_chained_deep_are_refused(tmp_path: Path) -> None:
    # Each pax header applies to the next header, which tarfile reads by recursion.
    tar = RawTar(tmp_path / "chained.tar")
    for _ in range(9):
        tar.header("././@PaxHeader", 0, b"x")
    tar.add("index.json", b"{}")
    tar.close()
    with pytest.raises(LayoutError, match="tar headers chained over 8 deep"):
        list(members(tar.path))


def test_global_headers_are_bounded_in_all(tmp_path: Path) -> None:
    tar = RawTar(tmp_path / "global.tar")
    for number in range(20):
        record = f"comment{number}=" + "c" * 4000 + "\n"
        body = f"{len(record) + 5} {record}".encode()
        tar.header("././@PaxHeader", len(body), b"g")
        tar.data([body], len(body))
        tar.add(f"file{number}", b"")
    tar.close()
    with pytest.raises(LayoutError, match="global tar headers over 65536 bytes"):
        list(members(tar.path))
