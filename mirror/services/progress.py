"""Progress on a terminal: an overall bar and one bar per item in flight.

Drawn on stderr and redrawn in place at most ten times a second; lines printed through
:meth:`Board.print` scroll above the bars, so results stay on screen when the bars go.
Off a terminal the commands print one line per item instead and never use this.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from mirror.services.inventory import human_size

WIDTH = 24
INTERVAL = 0.1
MAX_ITEMS = 8  # bars shown for items in flight; the overall bar counts the rest


def bar(done: int, total: int, width: int = WIDTH) -> str:
    filled = width * min(done, total) // total if total > 0 else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def amount(done: int, total: int) -> str:
    return f"{human_size(done)}/{human_size(total)}"


class Board:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._items: dict[str, tuple[int, int]] = {}
        self._overall = ""
        self._drawn = 0  # lines on screen below the printed ones
        self._shown = 0.0

    def item(self, label: str, done: int, total: int) -> None:
        self._items[label] = (done, total)
        self.refresh()

    def drop(self, label: str) -> None:
        self._items.pop(label, None)

    def overall(self, text: str) -> None:
        self._overall = text
        self.refresh()

    def print(self, line: str) -> None:
        self._clear()
        print(line, file=self._stream)
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._shown < INTERVAL:
            return
        self._shown = now
        columns = shutil.get_terminal_size().columns
        lines = [self._overall] if self._overall else []
        for label, (done, total) in list(self._items.items())[:MAX_ITEMS]:
            name = label if len(label) <= 40 else "…" + label[-39:]
            lines.append(f"  {name:<40} {bar(done, total)} {amount(done, total)}")
        self._clear()
        for line in lines:
            print(line[: columns - 1], file=self._stream)
        self._drawn = len(lines)
        self._stream.flush()

    def close(self) -> None:
        self._items.clear()
        self.refresh(force=True)

    def _clear(self) -> None:
        if self._drawn:
            # Up to the first bar, then clear to the end of the screen.
            self._stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
