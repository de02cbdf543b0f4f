"""Sizes and durations as operators write them: ``500MiB``, ``10GB``, ``5%``, ``30d``, ``12h``.

Pure parsing; the config loader turns the ``ValueError`` into an error that names the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``500MiB``, ``2TiB``, ``10GB`` (decimal) or ``1.5GiB``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 500MiB or 10GB")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.fullmatch(str(value))
        if match is None or match[2].lower() not in _SIZE_UNITS:
            raise ValueError("expected a size such as 500MiB, 50GiB, 2TiB or 10GB")
        number, unit = float(match[1]), match[2].lower()
    size = number * _SIZE_UNITS[unit]
    if size < 0 or math.isinf(size):
        raise ValueError("expected a size >= 0")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 12h or 30d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.fullmatch(str(value).lower())
        if match is None or match[2] not in _DURATION_UNITS:
            raise ValueError("expected a duration such as 90s, 15m, 12h or 30d")
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError("expected a duration >= 0")
    return seconds


@dataclass(frozen=True, slots=True)
class SizeOrShare:
    """A size in bytes, or a share of something (a filesystem) given in percent."""

    bytes: int | None = None
    percent: float | None = None

    def of(self, total: int) -> int:
        if self.percent is not None:
            return int(total * self.percent / 100)
        return self.bytes or 0


def parse_size_or_percent(value: object) -> SizeOrShare:
    """``5%`` of something, or a size as :func:`parse_size` reads it."""
    text = str(value).strip()
    if text.endswith("%"):
        percent = float(text[:-1])
        if not 0 <= percent <= 100:
            raise ValueError("expected a percentage between 0% and 100%")
        return SizeOrShare(percent=percent)
    return SizeOrShare(bytes=parse_size(value))


_RATE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600}
_RATE_UNITS["hour"] = 3600


def parse_rate(value: object) -> float:
    """Events per second from ``10/s``, ``600/min`` or ``1000/h``; ``0`` or ``off`` is none."""
    text = str(value).strip().lower()
    if value is False or text in ("0", "off", "none", "unlimited"):  # YAML reads `off` as false
        return 0.0
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ValueError("expected a rate such as 10/s, 600/min or 1000/h (or off)")
    return float(match[1]) / _RATE_UNITS[match[2]]


def parse_bool(value: Any) -> bool:
    """A setting's yes or no: a YAML boolean, or 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")
