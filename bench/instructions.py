"""Instructions per request: ``python -m bench.instructions [--seconds N]``.

req/s on a shared 2-core VM moves by up to ±30% between runs, more than a 10% effect such as
the access log's cost. callgrind counts the instructions the mirror executes instead: the
same count, within 1%, whatever else the machine is doing. The mirror runs under
``valgrind --tool=callgrind`` with counting off while it starts and warms up; counting is on
only while ``wrk`` sends cached tag manifest GETs. Printed per request: the defaults, the
access log off, and their ratio (issue 15's target for the log: at least 0.9x the log-off
rate, so at most 1.11x its work). ``bench/run.py`` prints the same row in its table.
User-space instructions only: the kernel's share of a request (the socket calls) is not in it.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import report
from bench.clients import wrk
from bench.content import build_and_push
from bench.lab import Lab, Plan
from bench.report import Row, row
from bench.services import free_port, http_status

START_TIMEOUT = 300.0  # Python under valgrind starts about 50 times slower
VARIANTS = {"defaults": (), "access log off": ("--log-level", "warning")}
REQUIRED = ("valgrind", "callgrind_control", "wrk")


def count(lab: Lab, url_path: str, extra: tuple[str, ...], seconds: int) -> tuple[int, int]:
    """(instructions, requests) of one mirror under callgrind while wrk loads ``url_path``."""
    workdir = Path(tempfile.mkdtemp(dir=lab.root, prefix="callgrind-"))
    port = free_port()
    out = workdir / "callgrind.out"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    command += [lab.mirror_executable, "serve", "--listen", f"127.0.0.1:{port}"]
    command += ["--data-dir", str(workdir / "data"), "--upstream", lab.upstream.url, *extra]
    with (workdir / "stderr.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while http_status(f"{base}/v2/", timeout=5) != 200:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the mirror under valgrind did not start: see {workdir}")
            time.sleep(1)
        for _ in range(3):  # fetched, stored, then answered from the cache
            urllib.request.urlopen(base + url_path, timeout=120).read()
        load = functools.partial(
            wrk, base + url_path, method="GET", accept="*/*", connections=8, threads=1
        )
        load(seconds=3, script_dir=workdir)  # warm, not counted
        subprocess.run(
            ["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True
        )
        result = load(seconds=seconds, script_dir=workdir)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(process.pid)], check=True, capture_output=True
        )
        subprocess.run(
            ["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True
        )
    finally:
        process.terminate()
        process.wait(timeout=120)
    dumps = sorted(workdir.glob("callgrind.out.*"))
    total = sum(_total(dump) for dump in dumps)
    return total, result.requests


def _total(dump: Path) -> int:
    """The ``totals:`` line of a callgrind dump (its ``summary:`` says 0 when counting
    started late, as it does here)."""
    for line in reversed(dump.read_text(errors="replace").splitlines()):
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def figure(lab: Lab, seconds: int = 15) -> list[Row]:
    """The row for bench/run.py's table: instructions per request, the defaults against the
    access log off, for the lab's small image (already pushed to its upstream)."""
    small = lab.images["small"]
    path = f"/v2/{small.repository}/manifests/{small.tag}"
    counts = {name: count(lab, path, extra, seconds) for name, extra in VARIANTS.items()}
    per_request = {name: total / requests for name, (total, requests) in counts.items()}
    on, off = per_request["defaults"], per_request["access log off"]
    return [
        row(
            "instructions per tag manifest GET (callgrind), defaults vs access log off",
            "",
            on,
            reference=off,
            reference_name="access log off",
            ratio=report.ratio_of(on, off),
            # At most 1/0.9 the work: the defaults' rate at least 0.9x the log-off rate.
            target=report.at_most_ratio(1.11, "log off"),
            repetitions=1,
            note=f"user-space instructions over {counts['defaults'][1]:,} and "
            f"{counts['access log off'][1]:,} requests; repeatable to 1% where req/s is not: "
            f"the log-off rate as a share, {off / on:.2f}x",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="counted load per variant")
    parser.add_argument("--mirror", default=str(Path(sys.executable).parent / "mirror"))
    arguments = parser.parse_args(argv)
    missing = [n for n in (*REQUIRED, "docker-registry", "skopeo") if shutil.which(n) is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="mirror-instructions-"))
    os.chmod(root, 0o755)
    lab = Lab(root, Plan.quick(), arguments.mirror)
    try:
        lab.start(lab.upstream)
        lab.images = build_and_push(root / "layout", 1024 * 1024, lab.upstream.host)
        print(report.table(figure(lab, arguments.seconds)))
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
