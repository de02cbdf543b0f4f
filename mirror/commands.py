"""The offline subcommands: each opens the engine on the data dir, does its work, and
returns an exit code. Printing is here; the work is in the modules they call."""

from __future__ import annotations

import sys

from mirror import inventory
from mirror.config import Settings
from mirror.engine import open_engine
from mirror.logs import configure
from mirror.pins import Pin


async def ls(settings: Settings, pattern: Pin | None, *, as_json: bool) -> int:
    configure("warning", settings.log_format)  # the listing is the output, not the log
    if settings.redis_url is None and not (settings.data_dir / "metadata.sqlite3").exists():
        print(f"mirror: error: no mirror data in {settings.data_dir}", file=sys.stderr)
        return 1
    async with open_engine(settings) as engine:
        rows = await inventory.list_images(engine, pattern)
    if as_json:
        print(inventory.as_json(rows))
    elif rows:
        print(inventory.as_table(rows))
    else:
        print("no cached images" + (f" match {pattern.text}" if pattern else ""), file=sys.stderr)
    return 0
