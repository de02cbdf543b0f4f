"""A fuzz run against a real mirror process: hostile requests, and what came of them.

    python -m tests.support.fuzz --requests 10000 [--seed 1] [--concurrency 32]

Starts two fake upstreams (docker.io, and ghcr.io reached with ``?ns=``), ``mirror serve``
in front of them, and sends requests built from pools of hostile parts: paths, names,
digests, tags, methods, ``ns`` values, Range headers, oversized, duplicated and non-UTF-8
headers, raw malformed bytes, and sockets half-closed or dropped mid-request. Each goes on
a connection of its own, as raw bytes, so nothing is cleaned up on the way.

What must hold: no 5xx except 502/503/504 (upstream trouble) with the registry's JSON
error body; every complete request is answered; the log has no traceback; the process
stays up and still answers /healthz. ``scripts/fuzz`` runs it; a test runs a short one.

Then slow clients (``--slow-clients``): downloads never read, pipelined requests whose
answers are never read, headers that never end, connections that send nothing. While they
are held, an ordinary client's pull must still get its bytes, and waiting on them must
cost the mirror little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.fakehub import FakeHub
from tests.support.fuzz_bundles import run_bundles
from tests.support.oci import Blob, Image, make_image, make_random_layer
from tests.support.process import MirrorProcess

ANSWER_TIMEOUT = 15.0  # a complete request not answered in this long has hung
SLOW_HOLD = 2.0  # seconds the slow clients are held after the ordinary pull
DRAIN_TIMEOUT = 1.0  # how long to listen after bytes that are not a complete request
UPSTREAM_STATUSES = (502, 503, 504)


@dataclass(frozen=True)
class Case:
    kind: str  # its family, for the report
    data: bytes  # sent as is
    answer: bool  # a complete request: an answer must come
    half_close: bool = False  # shut the sending side down after the bytes
    bodiless: bool = False  # a HEAD: the answer has no body whatever its Content-Length


@dataclass
class Report:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)  # non-access log events
    foreign_lines: Counter[str] = field(default_factory=Counter)  # log lines not JSON
    log_lines: int = 0
    log_bytes: int = 0
    tracebacks: int = 0
    alive: bool = False
    seconds: float = 0.0
    upstream: Counter[str] = field(default_factory=Counter)  # requests the upstreams saw
    slow_cpu: float = 0.0  # CPU seconds the mirror spent while slow clients were held
    slow_seconds: float = 0.0  # for how long

    @property
    def ok(self) -> bool:
        return self.alive and not self.violations and self.tracebacks == 0

    def render(self) -> str:
        lines = [
            f"sent {self.sent} requests in {self.seconds:.1f} s; process alive: {self.alive}",
            "by status: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
            "by kind: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())),
            "upstream requests: " + ", ".join(f"{k}={v}" for k, v in sorted(self.upstream.items())),
            f"log: {self.log_lines} lines, {self.log_bytes} bytes, {self.tracebacks} tracebacks",
            f"slow clients held {self.slow_seconds:.1f} s; mirror CPU meanwhile "
            f"{self.slow_cpu:.2f} s",
            "log events (other than access lines): "
            + ", ".join(f"{k}={v}" for k, v in self.events.most_common()),
        ]
        lines += [f"  non-JSON log line x{n}: {text}" for text, n in self.foreign_lines.items()]
        lines.append(f"violations: {len(self.violations)}")
        lines += [f"  {text}" for text in self.violations[:20]]
        return "\n".join(lines)


class Cases:
    """Hostile requests, reproducible from a seed."""

    def __init__(self, rng: random.Random, image: Image, second: Image) -> None:
        self.rng = rng
        layer = image.layers[-1].digest
        hex64 = "".join(rng.choice("0123456789abcdef") for _ in range(64))
        self.usual_tags = ["1.0", "latest", "2.0", "9.9", image.digest, second.digest]
        self.usual_digests = [blob.digest for blob in (*image.layers, *second.layers)]
        self.usual_digests += [image.config.digest, second.config.digest]
        self.names = [
            "app", "library/app", "org/app", "org/tool", "a" * 248, "b/" * 130, "../etc",
            "app/../../x", "%2e%2e/x", "x//y", "-x", "x-", "\u00fc", "App", "a" * 300,
            "app%00", "app%2fx", "app;x", ".", "_", "a.b-c__d/e",
        ]  # fmt: skip
        self.tags = [
            "1.0", "latest", "x" * 128, "x" * 129, ".INVALID_MANIFEST_NAME", "%ff", "-x", "a:b",
            image.digest, second.digest, f"sha256:{hex64}", "sha256:abc", "md5:" + "0" * 32,
            "sha512:" + "f" * 128, "SHA256:" + hex64, "sha256:" + "0" * 64 + "0",
        ]  # fmt: skip
        self.digests = [
            layer, image.digest, f"sha256:{hex64}", "sha256:XYZ", "sha256:", "sha384:" + "1" * 96,
            "md5:" + "a" * 32, "sha256:" + hex64.upper(), "sha256:" + "0" * 64, "%00",
        ]  # fmt: skip
        self.queries = [
            "", "", "?ns=docker.io", "?ns=ghcr.io", "?ns=ghcr.io", "?ns=quay.io", "?ns=",
            "?ns=" + "a" * 500, "?ns=ghcr.io&ns=docker.io", "?ns=%00", "?ns=..%2f", "?ns=\u00e9",
            "?n=-1", "?n=abc", "?n=" + "9" * 30, "?last=%ff%fe", "?n=2&last=1.0", "?ns=ghcr.io&n=1",
            "?%%%", "?" + "&".join(["x=1"] * 300),
        ]  # fmt: skip
        self.ranges = [
            "bytes=0-0", "bytes=0-", "bytes=-1", "bytes=5-1", "bytes=-0", "bytes=0-1,2-3",
            "bytes=abc", "bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 30, "items=0-1",
            "bytes=-", "", "bytes = 0-1", "bytes=18446744073709551616-", "bytes=-" + "1" * 4400,
        ]  # fmt: skip
        self.methods = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "get", "BREW",
            "M" * 300,
        ]  # fmt: skip

    def next(self) -> Case:
        roll = self.rng.random()
        if roll < 0.35:
            return self.path_case()
        if roll < 0.45:
            return self.method_case()
        if roll < 0.70:
            return self.header_case()
        if roll < 0.85:
            return self.raw_case()
        return self.half_closed_case()

    def either(self, usual: list[str], hostile: list[str]) -> str:
        """Half the time a part that exists, so requests get past validation to the
        resolver and the upstreams."""
        return self.rng.choice(usual if self.rng.random() < 0.5 else hostile)

    def path(self) -> str:
        pick = self.rng.choice
        name = self.either(["app", "library/app", "org/app", "org/tool", "x/y"], self.names)
        kind = self.rng.choices(
            ["manifests", "blobs", "tags/list", "blobs/uploads/", "referrers", "", "manifests/x"],
            [40, 30, 15, 5, 4, 3, 3],
        )[0]
        if kind == "manifests":
            tail = f"manifests/{self.either(self.usual_tags, self.tags)}"
        elif kind == "blobs":
            tail = f"blobs/{self.either(self.usual_digests, self.digests)}"
        else:
            tail = kind
        return f"/v2/{name}/{tail}{pick(self.queries)}"

    def request(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], kind: str
    ) -> Case:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: mirror"]
        lines += [name + b": " + value for name, value in headers]
        lines.append(b"Connection: close")
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        return Case(kind, data, answer=True, bodiless=method == "HEAD")

    def path_case(self) -> Case:
        method = self.rng.choices(["GET", "HEAD"], [3, 1])[0]
        return self.request(method, self.path(), [], "path")

    def method_case(self) -> Case:
        path = self.rng.choice([self.path(), "/v2/", "/healthz", "/metrics", "/readyz", "/x"])
        return self.request(self.rng.choice(self.methods), path, [], "method")

    def header_case(self) -> Case:
        pick = self.rng.choice
        builders: list[Callable[[], list[tuple[bytes, bytes]]]] = [
            lambda: [(b"Range", pick(self.ranges).encode())],
            lambda: [(b"Expect", pick([b"100-continue", b"\xff\xfe", b"x" * 100, b""]))],
            lambda: [(b"Accept", pick([b"*/*", b"text/html", b";;;,,", b"a/b;" * 2000]))],
            lambda: [(b"X-Big", b"a" * self.rng.choice([8000, 16000, 20000, 70000]))],
            lambda: [(b"X-Many-%d" % i, b"v") for i in range(self.rng.choice([50, 120, 200]))],
            lambda: [(b"Range", b"bytes=0-1"), (b"Range", b"bytes=2-3")],
            lambda: [(b"Host", b"a"), (b"Host", b"b")],
            lambda: [(b"Content-Length", b"1"), (b"Content-Length", b"2")],
            lambda: [(b"Content-Length", pick([b"-1", b"abc", b"9" * 30]))],
            lambda: [(b"User-Agent", self.high_bytes(64))],
            lambda: [(b"If-None-Match", pick([b'"x"', b"*", b"\x00", b'"' * 500]))],
            lambda: [(b"Authorization", pick([b"Bearer", b"Basic !!!", b"Bearer " + b"a" * 9000]))],
            lambda: [(b"Bad Name", b"x")],
            lambda: [(b"X-Fold", b"a\r\n continued")],
            lambda: [(b"X-Null", b"a\x00b")],
            lambda: [(b"Transfer-Encoding", pick([b"chunked", b"gzip", b"chunked, chunked"]))],
        ]
        headers = [item for _ in range(self.rng.randint(1, 3)) for item in pick(builders)()]
        method = self.rng.choices(["GET", "HEAD"], [3, 1])[0]
        return self.request(method, self.path(), headers, "header")

    def raw_case(self) -> Case:
        pick = self.rng.choice
        choices: list[Callable[[], bytes]] = [
            lambda: self.rng.randbytes(self.rng.randint(1, 2000)),
            lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + self.rng.randbytes(200),
            lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            lambda: b"GET\r\n\r\n",
            lambda: b"GET /v2/ HTTP/1.1\n\n",
            lambda: b"\r\n\r\n\r\n",
            lambda: b"GET http://elsewhere/v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"CONNECT elsewhere:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            lambda: b"GET /v2/ HTTP/1.0\r\n\r\n",
            lambda: b"GET /\r\n",
            lambda: b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n" * 3,
            lambda: b"GET /v2/ a b c HTTP/1.1\r\n\r\n",
            lambda: b"GET " + self.path().encode() + b"\x00 HTTP/1.1\r\n\r\n",
            lambda: b"GET /v2/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            lambda: b"GET /v2/" + self.high_bytes(40) + b" HTTP/1.1\r\n\r\n",
        ]  # fmt: skip
        return Case("raw", pick(choices)(), answer=False)

    def high_bytes(self, count: int) -> bytes:
        """Bytes that are not ASCII, and mostly not UTF-8 either."""
        return bytes(self.rng.randrange(128, 256) for _ in range(count))

    def half_closed_case(self) -> Case:
        pick = self.rng.choice
        complete = self.request(pick(["GET", "HEAD"]), self.path(), [], "half-closed").data
        data = pick([complete, complete[: self.rng.randint(0, len(complete))], b""])
        return Case("half-closed", data, answer=False, half_close=pick([True, False]))


async def _exchange(host: str, case: Case) -> tuple[bytes, bool]:
    """Send a case on a connection of its own: (what came back, whether it timed out)."""
    address, _, port = host.rpartition(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    received = bytearray()
    try:
        writer.write(case.data)
        await writer.drain()
        if case.half_close:
            writer.write_eof()
        timeout = ANSWER_TIMEOUT if case.answer else DRAIN_TIMEOUT
        async with asyncio.timeout(timeout):
            while not _complete(received, case.bodiless):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
    except TimeoutError:
        return bytes(received), True
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()
    return bytes(received), False


def _final(data: bytes) -> bytes:
    """The answer without the interim (1xx) responses before it."""
    while data.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in data:
        data = data.partition(b"\r\n\r\n")[2]
    return data


def _complete(data: bytearray, bodiless: bool) -> bool:
    head, found, body = _final(bytes(data)).partition(b"\r\n\r\n")
    if not found:
        return False
    headers = _headers(head)
    if bodiless or _status(head) in (204, 304):
        return True
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"])
    if "chunked" in headers.get("transfer-encoding", ""):
        return body.endswith(b"0\r\n\r\n")
    return False


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _judge(case: Case, received: bytes, timed_out: bool, report: Report) -> None:
    report.kinds[case.kind] += 1
    received = _final(received)
    if not received.startswith(b"HTTP/"):
        outcome = "no answer (timeout)" if timed_out else "closed"
        report.statuses[outcome] += 1
        if case.answer:
            report.violations.append(f"{outcome}: {case.data[:200]!r}")
        return
    head, _, body = received.partition(b"\r\n\r\n")
    status = _status(head)
    report.statuses[str(status)] += 1
    if status < 500:
        return
    headers = _headers(head)
    has_body = case.bodiless or b'"errors"' in body
    json_body = "application/json" in headers.get("content-type", "") and has_body
    if status not in UPSTREAM_STATUSES or not json_body:
        report.violations.append(f"{status}: {case.data[:200]!r} -> {received[:300]!r}")


def _read_log(process: MirrorProcess, report: Report) -> None:
    text = process.log()
    report.log_bytes = len(text.encode())
    report.tracebacks = text.count("Traceback (most recent call last)")
    for line in text.splitlines():
        report.log_lines += 1
        try:
            event = json.loads(line).get("event")
        except ValueError:
            report.foreign_lines[line[:160]] += 1
            continue
        if event != "request":
            report.events[str(event)] += 1


def _slow_requests(path: str) -> dict[str, bytes]:
    ranged = f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-59999\r\n\r\n".encode()
    whole = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return {
        "slow-unread-download": whole,
        "slow-pipelined-unread": ranged * 200 + whole,
        "slow-endless-headers": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: a",
        "slow-silent": b"",
    }


async def _slow_client(host: str, data: bytes) -> socket.socket:
    """A connection that sends ``data`` (as much as the mirror takes in a second) and then
    reads nothing, with a receive buffer as small as the kernel allows."""
    address, _, port = host.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (address, int(port)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.sock_sendall(sock, data), 1.0)
    return sock


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _pull(url: str) -> tuple[list[int], bytes]:
    """GET as pulling clients do: again after a 503, Retry-After later, a few times."""
    statuses: list[int] = []
    body = b""
    timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(10):
            async with session.get(url) as answer:
                statuses.append(answer.status)
                body = await answer.read()
                if answer.status != 503:
                    break
                await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
    return statuses, body


async def _slow_clients(process: MirrorProcess, count: int, blob: Blob, report: Report) -> None:
    path = f"/v2/library/big/blobs/{blob.digest}"
    await _pull(f"{process.url}{path}")  # cached before the slow clients come
    kinds = list(_slow_requests(path).items())
    held: list[socket.socket] = []
    try:
        for number in range(count):
            kind, data = kinds[number % len(kinds)]
            report.kinds[kind] += 1
            try:
                held.append(await _slow_client(process.host, data))
            except OSError as error:
                report.violations.append(f"{kind}: connect failed: {error!r}")
        started, cpu = time.monotonic(), _cpu_seconds(process.pid)
        statuses, body = await _pull(f"{process.url}{path}")
        report.statuses[f"pull beside slow clients: {statuses[-1]}"] += 1
        if statuses[-1] != 200 or body != blob.data:
            report.violations.append(f"a pull beside slow clients got {statuses}")
        await asyncio.sleep(SLOW_HOLD)
        report.slow_seconds = time.monotonic() - started
        report.slow_cpu = _cpu_seconds(process.pid) - cpu
        if report.slow_cpu > report.slow_seconds / 4:
            report.violations.append(
                f"slow clients cost {report.slow_cpu:.2f} CPU s in {report.slow_seconds:.1f} s"
            )
    finally:
        for sock in held:
            sock.close()


async def _healthy(host: str) -> bool:
    case = Case("check", b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", True)
    received, _ = await _exchange(host, case)
    return received.startswith(b"HTTP/1.1 200")


async def run(
    requests: int,
    *,
    seed: int = 1,
    concurrency: int = 32,
    work_dir: Path,
    serve_args: tuple[str, ...] = (),
    slow_clients: int = 40,
) -> Report:
    report = Report()
    async with FakeHub() as hub, FakeHub() as second:
        image = make_image([make_random_layer(32 * 1024, seed=seed)])
        other = make_image([make_random_layer(16 * 1024, seed=seed + 1)])
        for tag in ("1.0", "latest", "1.1", "2.0"):
            hub.add_image("library/app", tag, image)
            second.add_image("org/app", tag, other)
        hub.add_image("org/tool", "latest", other)
        big = make_random_layer(4 * 1024 * 1024, seed=seed + 2)
        hub.add_image("library/big", "latest", make_image([big]))
        process = MirrorProcess(
            work_dir / "data",
            hub.url,
            "--upstream",
            f"ghcr.io={second.url}",
            *serve_args,
            name="fuzz",
        )
        await asyncio.to_thread(process.start)
        try:
            cases = Cases(random.Random(seed), image, other)
            gate = asyncio.Semaphore(concurrency)

            async def one(case: Case) -> None:
                async with gate:
                    try:
                        received, timed_out = await _exchange(process.host, case)
                    except OSError as error:  # could not even connect
                        report.violations.append(f"connect failed: {error!r}")
                        return
                    _judge(case, received, timed_out, report)

            started = time.monotonic()
            await asyncio.gather(*(one(cases.next()) for _ in range(requests)))
            report.sent = requests
            report.seconds = time.monotonic() - started
            if slow_clients:
                await _slow_clients(process, slow_clients, big, report)
            await asyncio.sleep(0.5)  # the last access lines
            report.alive = await _healthy(process.host)
        finally:
            await asyncio.to_thread(process.stop)
        _read_log(process, report)
        for name, fake in (("docker.io", hub), ("ghcr.io", second)):
            for entry in fake.log:
                report.upstream[f"{name} {entry.server}"] += 1
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--keep", type=Path, help="keep the data dir and log here")
    parser.add_argument("--workers", type=int, default=1, help="mirror serve --workers")
    parser.add_argument(
        "--bundles", type=int, metavar="N", help="instead: N hostile bundles for mirror import"
    )
    parser.add_argument(
        "--slow-clients", type=int, default=40, help="slow clients held at the end (0: none)"
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        if args.bundles is not None:
            bundles = run_bundles(args.bundles, seed=args.seed, work_dir=work)
            print(bundles.render())
            return 0 if bundles.ok else 1
        serve_args = ("--workers", str(args.workers)) if args.workers > 1 else ()
        report = asyncio.run(
            run(
                args.requests,
                seed=args.seed,
                concurrency=args.concurrency,
                work_dir=work,
                serve_args=serve_args,
                slow_clients=args.slow_clients,
            )
        )
        print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
