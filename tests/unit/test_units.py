import pytest

from mirror.domain.units import SizeOrShare, parse_duration, parse_size, parse_size_or_percent


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        (4096, 4096),
        ("500MiB", 500 * 1024**2),
        ("50GiB", 50 * 1024**3),
        ("2TiB", 2 * 1024**4),
        ("10GB", 10 * 1000**3),
        ("1.5 GiB", int(1.5 * 1024**3)),
        ("64mib", 64 * 1024**2),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "10XB", "-5MiB", True, "5 MiB GiB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), (90, 90.0), ("90s", 90.0), ("15m", 900.0), ("12h", 43200.0), ("30d", 2592000.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5y", "-1h", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_size_or_percent() -> None:
    assert parse_size_or_percent("5%").of(1000) == 50
    assert parse_size_or_percent("1GiB") == SizeOrShare(bytes=1024**3)
    with pytest.raises(ValueError, match="percentage"):
        parse_size_or_percent("120%")
