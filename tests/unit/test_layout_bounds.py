"""What reading a layout may cost: bounds set small, so a test needs no large file."""

from pathlib import Path

import pytest

from mirror.layout import Bounds, LayoutError, members
from tests.support.bundles import RawTar


def test_the_number_of_tar_entries_is_bounded(tmp_path: Path) -> None:
    tar = RawTar(tmp_path / "many.tar")
    for number in range(101):
        tar.header(f"e{number}", 0)
    tar.close()
    assert len(list(members(tar.path, Bounds(members=101)))) == 101
    with pytest.raises(LayoutError, match=r"many\.tar: more than 100 tar entries"):
        list(members(tar.path, Bounds(members=100)))
