"""Load and observation: curl for blobs, wrk for manifests, /proc for memory, access logs.

Blob clients are curl writing to /dev/null, the cheapest way to take bytes off a socket.
Concurrent pulls are one ``curl --parallel`` process holding N connections: on two cores, N
client processes would out-number the server in the scheduler and slow it for no reason of
its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CURL_TIMEOUT = 600.0
RSS_INTERVAL = 0.02
_WRITE_OUT = "%{http_code} %{size_download} %{time_total} %{time_starttransfer} %{url}\\n"


@dataclass(frozen=True)
class Transfer:
    status: int
    size: int
    seconds: float
    first_byte: float = 0.0  # seconds from the start to the first byte of the body
    url: str = ""  # the URL asked for (before any redirect)


@dataclass(frozen=True)
class Parallel:
    wall: float
    transfers: list[Transfer]


def _curl(arguments: list[str], timeout: float) -> tuple[float, list[Transfer]]:
    command = ["curl", "--silent", "--show-error", "--max-time", str(int(timeout))]
    command += ["--write-out", _WRITE_OUT, *arguments]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, timeout=timeout + 30, check=False)
    wall = time.perf_counter() - started
    transfers = [_transfer(line) for line in result.stdout.decode().splitlines() if line]
    if result.returncode != 0 and not transfers:
        raise RuntimeError(f"curl failed: {result.stderr.decode(errors='replace')}")
    return wall, transfers


def _transfer(line: str) -> Transfer:
    status, size, seconds, first_byte, url = line.split(maxsplit=4)
    return Transfer(int(status), int(size), float(seconds), float(first_byte), url)


def fetch(
    url: str, *, expect_size: int, timeout: float = CURL_TIMEOUT, follow: bool = False
) -> Transfer:
    """One GET of ``url`` to /dev/null; its time is curl's, from connect to the last byte
    (with ``follow``, of the redirect's target too)."""
    arguments = ["--location"] if follow else []
    _, transfers = _curl([*arguments, "--output", "/dev/null", url], timeout)
    _check(url, transfers, expect_size)
    return transfers[0]


def fetch_parallel(
    url: str, clients: int, *, expect_size: int, timeout: float = CURL_TIMEOUT
) -> Parallel:
    """``clients`` simultaneous GETs of ``url``, each on its own connection."""
    return fetch_each([url] * clients, expect_size=expect_size, timeout=timeout)


def fetch_each(urls: list[str], *, expect_size: int, timeout: float = CURL_TIMEOUT) -> Parallel:
    """One GET of each of ``urls``, all at once, each on its own connection; the transfers
    in the order they ended (each names its URL)."""
    arguments = ["--parallel", "--parallel-immediate", "--parallel-max", str(len(urls))]
    for url in urls:
        arguments += ["--output", "/dev/null", url]
    wall, transfers = _curl(arguments, timeout)
    if len(transfers) != len(urls):
        raise RuntimeError(f"{len(transfers)} of {len(urls)} transfers of {urls[0]} reported")
    _check(urls[0], transfers, expect_size)
    return Parallel(wall, transfers)


def _check(url: str, transfers: list[Transfer], expect_size: int) -> None:
    bad = [t for t in transfers if t.status != 200 or t.size != expect_size]
    if not transfers or bad:
        raise RuntimeError(f"GET {url}: expected 200 and {expect_size} bytes, got {bad}")


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx/3xx responses plus socket errors


_WRK_SCRIPT = """\
wrk.method = "{method}"
wrk.headers["Accept"] = "{accept}"
"""
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk(
    url: str,
    *,
    method: str,
    accept: str,
    seconds: int,
    connections: int,
    threads: int,
    script_dir: Path,
) -> WrkResult:
    """``wrk -tT -cC -dDs --latency`` with a Lua script setting the method and Accept."""
    script = script_dir / f"wrk-{method.lower()}.lua"
    script.write_text(_WRK_SCRIPT.format(method=method, accept=accept))
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += ["--timeout", "5s", "-s", str(script), url]
    result = subprocess.run(command, capture_output=True, timeout=seconds + 60, check=True)
    return parse_wrk(result.stdout.decode())


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    if rate is None or p99 is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(int(n) for n in sockets.groups()) if sockets else 0
    return WrkResult(
        requests_per_second=float(rate.group(1)),
        p99_ms=float(p99.group(1)) * _UNITS_MS[p99.group(2)],
        requests=int(total.group(1)),
        errors=errors,
    )


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for PID {pid}")


@dataclass
class MemoryWatch:
    """Samples VmRSS of one process while in use; ``peak_kib`` also counts its VmHWM.

    VmHWM is the process's own high-water mark, so it catches a peak between two samples;
    for a process started fresh for the measurement it is the peak of the measurement.
    """

    pid: int
    peak_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> MemoryWatch:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmHWM"))

    def _sample(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmRSS"))


_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    status: int


class AccessLog:
    """Requests a docker-registry logged (combined log format on its stdout)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, mark: int) -> list[Request]:
        with self.path.open("rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
        matches = (_ACCESS_LINE.search(line) for line in text.splitlines())
        return [Request(m["method"], m["path"], int(m["status"])) for m in matches if m]

    def settle(self, mark: int, *, quiet: float = 0.5, timeout: float = 30.0) -> list[Request]:
        """The requests since ``mark`` once no new line has arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            size = self.mark()
            if size == seen:
                break
            seen = size
            time.sleep(quiet)
        return self.since(mark)


def head_load(
    url: str, *, method: str, accept: str, seconds: int, connections: int, threads: int
) -> WrkResult:
    """``wrk``'s figures from ``bench.headload``, ``threads`` processes sharing the connections."""
    command = [sys.executable, "-m", "bench.headload", url, "--method", method]
    command += ["--accept", accept, "--seconds", str(seconds)]
    command += ["--connections", str(connections // threads)]
    root = str(Path(__file__).resolve().parent.parent)
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, cwd=root) for _ in range(threads)
    ]
    try:
        outputs = [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    latencies = sorted(n for output in outputs for n in output["latencies_us"])
    if not latencies:
        raise RuntimeError(f"bench.headload: no {method} of {url} completed")
    elapsed = max(output["elapsed"] for output in outputs)
    return WrkResult(
        requests_per_second=len(latencies) / elapsed,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000,
        requests=len(latencies),
        errors=sum(output["errors"] for output in outputs),
    )
