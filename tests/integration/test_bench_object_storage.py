"""``python -m bench.object_storage`` at a tiny size: every figure of issue 23's benchmark is
measured (a real SeaweedFS, Redis, docker-registry and curl), so the script keeps working
between the runs recorded in bench/README.md. Its numbers are not judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.binaries import require_binary
from tests.support.seaweedfs import weed_binary

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_object_storage_benchmark_measures_every_figure(tmp_path: Path) -> None:
    for name in ("docker-registry", "skopeo", "curl", "redis-server"):
        require_binary(name)
    weed_binary()
    out = tmp_path / "figures.json"
    command = [sys.executable, "-m", "bench.object_storage", "--quick", "--size-mib", "8"]
    result = subprocess.run(
        [*command, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["figure"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 11
    assert all(row["mirror"] is not None for row in rows.values())
    crowd = [row for name, row in rows.items() if name.endswith("upstream blob GETs (worst)")]
    assert [row["mirror"] for row in crowd] == [1]
