"""The benchmark suite of issue 6: one command, everything on loopback, a table and JSON.

    .venv/bin/python bench/run.py [--quick] [--out bench/results/latest.json]

It builds the images, starts an upstream docker-registry, the mirror, nginx and a registry
proxy under one temporary directory, measures, prints the table, writes the JSON and stops
every process it started, by PID, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import content, figures, instructions, report
from bench.lab import Lab, Plan, wait_stored
from bench.report import Row

REQUIRED = (
    "docker-registry",
    "skopeo",
    "nginx",
    "wrk",
    "curl",
    "containerd",
    "ctr",
    *instructions.REQUIRED,
)
MIB = 1024 * 1024


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB blob, fewer repetitions")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    parser.add_argument("--blob-mib", type=int, help="size of the large blob (MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--mirror",
        default=str(Path(sys.executable).with_name("mirror")),
        help="the mirror executable (default: the one beside this Python)",
    )
    return parser.parse_args(argv)


def _plan(arguments: argparse.Namespace) -> Plan:
    plan = Plan.quick() if arguments.quick else Plan.full()
    if arguments.blob_mib:
        plan = Plan(**{**plan.__dict__, "blob_mib": arguments.blob_mib})
    return plan


def stop_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def step(title: str, work: Callable[[], Any]) -> Any:
    print(f"-- {title} ...", flush=True)
    started = time.monotonic()
    result = work()
    print(f"   done in {time.monotonic() - started:.1f} s", flush=True)
    return result


def measure(lab: Lab) -> list[Row]:
    plan = lab.plan
    layout = lab.root / "layout"
    lab.start(lab.upstream)
    lab.images = step(
        f"building and pushing a {plan.blob_mib} MiB blob",
        lambda: content.build_and_push(layout, plan.blob_mib * MIB, lab.upstream.host),
    )
    nginx = lab.new_nginx(layout / "blobs" / "sha256")
    mirror, proxy = lab.new_mirror(), lab.new_proxy()
    rows: list[Row] = []
    rows += step("1. warm blob", lambda: figures.warm_blob(lab, mirror, proxy, nginx))
    rows += step("2. warm tag manifests (wrk)", lambda: figures.warm_manifests(lab, mirror, proxy))
    wait_stored(proxy, lab.images["big"].layer.digest)
    lab.discard(mirror)
    lab.discard(proxy)
    rows += step("7. the defaults and their cost", lambda: figures.defaults(lab, nginx))
    cold_rows, one_cold = step("3. cold pull", lambda: figures.cold_pull(lab))
    rows += cold_rows
    for clients in plan.concurrency:
        rows += step(
            f"4/5. {clients} concurrent cold pulls",
            lambda n=clients: figures.concurrent_pulls(lab, n, one_cold, nginx),  # type: ignore[misc]
        )
    lab.stop(nginx)
    rows += step("6. --workers N", lambda: figures.workers_scaling(lab))
    rows += step("8. a whole pull by containerd", lambda: figures.whole_pull(lab))
    rows += step("9. instructions per request (callgrind)", lambda: instructions.figure(lab))
    return rows


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    missing = [name for name in REQUIRED if shutil.which(name) is None]
    if missing:
        print(f"bench: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    plan = _plan(arguments)
    stop_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    os.chmod(root, 0o755)  # nginx workers run as nobody and must reach the blob
    lab = Lab(root, plan, arguments.mirror)
    started = time.monotonic()
    try:
        rows = measure(lab)
    finally:
        lab.close()
        if not arguments.keep:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    _publish(rows, plan, arguments, elapsed)
    return 0


def _publish(rows: list[Row], plan: Plan, arguments: argparse.Namespace, elapsed: float) -> None:
    print()
    print(
        f"mirror benchmark ({'quick' if arguments.quick else 'full'}): "
        f"{plan.blob_mib} MiB blob, {elapsed:.0f} s; medians of the repetitions shown"
    )
    print(_repetitions(plan))
    print(report.table(rows))
    context = {
        "mode": "quick" if arguments.quick else "full",
        "plan": plan.__dict__,
        "elapsed_seconds": round(elapsed, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mirror_source": source_state(),
    }
    report.write_json(arguments.out, rows, context)
    print(f"\nwritten to {arguments.out}")


def source_state() -> dict[str, str]:
    """The commit measured, and whether mirror/ had uncommitted changes at the time."""
    root = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", *arguments], cwd=root, capture_output=True, timeout=30, check=False
        )
        return result.stdout.decode(errors="replace").strip()

    changed = git("status", "--porcelain", "--", "mirror")
    return {"commit": git("rev-parse", "HEAD"), "mirror_changes": changed or "none"}


def _repetitions(plan: Plan) -> str:
    return (
        f"repetitions: warm blob {plan.blob_repetitions}, wrk {plan.wrk_repetitions} x "
        f"{plan.wrk_seconds} s, cold pull {plan.cold_repetitions}, concurrent "
        f"{plan.concurrent_repetitions} (registry proxy {plan.proxy_concurrent_repetitions})"
    )
