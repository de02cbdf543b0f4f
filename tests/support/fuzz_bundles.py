"""Hostile bundles against ``mirror import``: ``scripts/fuzz --bundles N``.

Builds N bundles of the kinds in ``tests.support.bundles`` (huge tar headers, a zstd bomb,
manifests of many MiB before the index, too many entries, wrong JSON types, names that are
not names, wrong sizes, an index of thousands of absent children, blobs another repository
holds), imports each into one data dir that holds an image already, and checks what must
hold: a non-zero exit with its reason on stderr, no traceback, every line short, the whole
output bounded, and the import's peak memory (RSS) under a bound.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.bundles import HELD, KINDS, image_bundle

PEAK_RSS_KIB = 400 * 1024  # the manifests kept (128 MiB) and Python, with room to spare
MAX_OUTPUT = 64 * 1024
MAX_LINE = 1000
IMPORT_TIMEOUT = 300.0

# Peak RSS of the import (KiB), measured in a process of its own: RUSAGE_CHILDREN is the
# largest child a process ever waited for.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stdout.write(done.stdout)\n"
    "sys.stderr.write(done.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(done.returncode)\n"
)


@dataclass(frozen=True)
class Imported:
    returncode: int
    stdout: str
    stderr: str
    peak_kib: int
    seconds: float


def import_measured(data: Path, *args: str | Path) -> Imported:
    """``mirror import`` as users run it: what it printed, its peak RSS, how long it took."""
    command = [sys.executable, "-m", "mirror", "import", "--data-dir", str(data), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command],
        capture_output=True, text=True, timeout=IMPORT_TIMEOUT, env=env, check=False,
    )  # fmt: skip
    stderr, _, peak = done.stderr.rstrip("\n").rpartition("\n")
    return Imported(
        done.returncode,
        done.stdout,
        stderr + "\n" if stderr else "",
        int(peak),
        time.monotonic() - started,
    )


@dataclass
class BundleReport:
    imported: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    peak_kib: int = 0
    largest_output: int = 0
    slowest: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def render(self) -> str:
        lines = [
            f"imported {self.imported} hostile bundles in {self.seconds:.1f} s",
            "by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())),
            f"peak RSS of an import: {self.peak_kib // 1024} MiB (bound {PEAK_RSS_KIB // 1024}),"
            f" largest output {self.largest_output} bytes, slowest {self.slowest:.1f} s",
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  {text}" for text in self.violations[:20]]
        return "\n".join(lines)


def judge(kind: str, expected: str, done: Imported, report: BundleReport) -> None:
    report.imported += 1
    report.kinds[kind] += 1
    report.peak_kib = max(report.peak_kib, done.peak_kib)
    output = done.stdout + done.stderr
    report.largest_output = max(report.largest_output, len(output))
    report.slowest = max(report.slowest, done.seconds)
    problems = []
    if done.returncode != 1:
        problems.append(f"exit {done.returncode}")
    if "Traceback" in output:
        problems.append("a traceback")
    if not done.stderr.strip():
        problems.append("nothing on stderr")
    if not any(piece in done.stderr for piece in expected.split("|")):
        problems.append(f"stderr without {expected!r}")
    if len(output) > MAX_OUTPUT or any(len(line) > MAX_LINE for line in output.splitlines()):
        problems.append(f"{len(output)} bytes of output")
    if done.peak_kib > PEAK_RSS_KIB:
        problems.append(f"peak RSS {done.peak_kib // 1024} MiB")
    if problems:
        report.violations.append(f"{kind}: {', '.join(problems)}: {done.stderr[:300]!r}")


def run_bundles(
    count: int, *, seed: int = 1, work_dir: Path, kinds: list[str] | None = None
) -> BundleReport:
    """Import ``count`` hostile bundles (kinds drawn at random, or ``kinds`` in turn)."""
    report = BundleReport()
    rng = random.Random(seed)
    data = work_dir / "data"
    held = import_measured(data, image_bundle(work_dir / "held.tar", "held:1", HELD))
    if held.returncode != 0:
        report.violations.append(f"the legitimate bundle did not import: {held.stderr[:300]}")
        return report
    started = time.monotonic()
    for number in range(count):
        kind = kinds[number % len(kinds)] if kinds else rng.choice(sorted(KINDS))
        directory = work_dir / f"bundle-{number}"
        directory.mkdir()
        path, expected = KINDS[kind](directory / f"{kind}.tar.zst", rng)
        try:
            judge(kind, expected, import_measured(data, path), report)
        except subprocess.TimeoutExpired:
            report.violations.append(f"{kind}: no answer in {IMPORT_TIMEOUT:.0f} s")
        path.unlink()
    report.seconds = time.monotonic() - started
    return report
