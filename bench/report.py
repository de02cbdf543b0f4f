"""Rows of figures, the targets of issue 6, and the table and JSON they are written as."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """A goal for one row: ``text`` for people, ``check(value, ratio)`` for the table."""

    text: str
    check: Callable[[float, float | None], bool]


def at_most_ratio(limit: float, of: str) -> Target:
    return Target(f"≤ {limit:g}x {of}", lambda _, ratio: ratio is not None and ratio <= limit)


def at_least_ratio(limit: float, of: str) -> Target:
    return Target(f"≥ {limit:g}x {of}", lambda _, ratio: ratio is not None and ratio >= limit)


def below(limit: float, unit: str) -> Target:
    return Target(f"< {limit:g} {unit}", lambda value, _: value < limit)


def at_most(limit: float, unit: str) -> Target:
    return Target(f"≤ {limit:g} {unit}", lambda value, _: value <= limit)


def exactly(count: int) -> Target:
    return Target(f"= {count}", lambda value, _: value == count)


def rate_and_ratio(rate: float, ratio: float, of: str) -> Target:
    def check(value: float, measured: float | None) -> bool:
        return value >= rate and measured is not None and measured >= ratio

    return Target(f"≥ {rate:,.0f}/s and ≥ {ratio:g}x {of}", check)


@dataclass
class Row:
    """One line of the table: the mirror's figure against a reference, and the target."""

    figure: str
    unit: str
    mirror: float | None
    reference: float | None = None
    reference_name: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    repetitions: int = 0
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)


def row(
    figure: str,
    unit: str,
    mirror: float | None,
    *,
    reference: float | None = None,
    reference_name: str = "",
    ratio: float | None = None,
    target: Target | None = None,
    repetitions: int = 0,
    note: str = "",
    samples: dict[str, list[float]] | None = None,
) -> Row:
    """A Row with its target checked against the mirror's figure and ratio."""
    met = None
    if target is not None and mirror is not None:
        met = target.check(mirror, ratio)
    return Row(
        figure=figure,
        unit=unit,
        mirror=mirror,
        reference=reference,
        reference_name=reference_name,
        ratio=ratio,
        target=target.text if target is not None else "",
        met=met,
        repetitions=repetitions,
        note=note,
        samples=samples or {},
    )


def not_available(figure: str, note: str) -> Row:
    return Row(figure=figure, unit="", mirror=None, note=note)


def ratio_of(value: float, reference: float) -> float | None:
    return value / reference if reference else None


_PRECISION = {"s": 3, "ms": 2, "MiB": 1, "MiB/s": 0, "req/s": 0, "": 0}


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    digits = _PRECISION.get(unit, 2)
    return f"{value:,.{digits}f} {unit}".strip()


def _cells(item: Row) -> list[str]:
    if item.mirror is None:
        return [item.figure, item.note or "n/a", "", "", item.target, ""]
    reference = _number(item.reference, item.unit) if item.reference is not None else ""
    if reference and item.reference_name:
        reference += f" ({item.reference_name})"
    ratio = f"{item.ratio:.2f}x" if item.ratio is not None else ""
    met = "" if item.met is None else ("yes" if item.met else "NO")
    return [item.figure, _number(item.mirror, item.unit), reference, ratio, item.target, met]


def table(rows: Sequence[Row]) -> str:
    header = ["figure", "mirror", "reference", "ratio", "target", "met?"]
    lines = [header, *(_cells(item) for item in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    ]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in rendered)


def write_json(path: Path, rows: Sequence[Row], context: dict[str, Any]) -> None:
    document = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        **context,
        "rows": [asdict(item) for item in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
