"""The running set-up: services under one temporary directory, and what was pushed.

``Lab`` owns every process it starts and stops them all in ``close()``, in reverse order,
whatever happened before (an error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.content import Image
from bench.services import Mirror, Nginx, Registry, Service, Throttle, descendants

S = TypeVar("S", bound=Service)
STORE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Plan:
    """How much to measure; ``quick()`` runs in about a minute, ``full()`` in several."""

    blob_mib: int
    blob_repetitions: int
    cold_repetitions: int
    concurrent_repetitions: int
    proxy_concurrent_repetitions: int
    wrk_repetitions: int
    wrk_seconds: int
    wrk_connections: int = 32
    wrk_threads: int = 2
    concurrency: tuple[int, ...] = (8, 50)
    link_mib: float = 100.0  # the upstream's uplink for the cold figures users feel
    workers: tuple[int, ...] = (1, 2)

    @classmethod
    def quick(cls) -> Plan:
        return cls(256, 3, 3, 1, 1, 1, 3)

    @classmethod
    def full(cls) -> Plan:
        return cls(1024, 9, 5, 3, 1, 3, 10)


class Lab:
    def __init__(self, root: Path, plan: Plan, mirror_executable: str) -> None:
        self.root = root
        self.plan = plan
        self.mirror_executable = mirror_executable
        self.images: dict[str, Image] = {}
        self._running: list[Service] = []
        self._serial = itertools.count(1)
        self.upstream = Registry(root / "upstream", "upstream")
        self._link: Throttle | None = None

    def start(self, service: S) -> S:
        self._running.append(service)
        service.start()
        return service

    def stop(self, service: Service) -> None:
        service.stop()
        if service in self._running:
            self._running.remove(service)

    def discard(self, service: Service) -> None:
        """Stop a service and delete its directory (a cached 1 GiB blob, say)."""
        self.stop(service)
        shutil.rmtree(service.workdir, ignore_errors=True)

    def restart(self, service: Service) -> None:
        """A new process on the same directory: its memory high-water mark starts over."""
        self.stop(service)
        self.start(service)

    def close(self) -> None:
        for service in reversed(self._running):
            service.stop()
        self._running.clear()

    @property
    def link(self) -> Throttle:
        """The upstream behind a link of ``plan.link_mib`` MiB/s, started on first use."""
        if self._link is None:
            throttle = Throttle(
                self.root / "link", target=self.upstream, rate_mib=self.plan.link_mib
            )
            self._link = self.start(throttle)
        return self._link

    def new_mirror(
        self,
        *,
        workers: int | None = None,
        upstream: Service | None = None,
        extra: tuple[str, ...] = (),
    ) -> Mirror:
        workdir = self.root / f"mirror-{next(self._serial)}"
        mirror = Mirror(
            workdir,
            executable=self.mirror_executable,
            upstream=(upstream or self.upstream).url,
            workers=workers,
            extra=extra,
        )
        return self.start(mirror)

    def new_proxy(self) -> Registry:
        workdir = self.root / f"proxy-{next(self._serial)}"
        return self.start(Registry(workdir, "proxy", proxy_of=self.upstream.url))

    def new_nginx(self, root: Path) -> Nginx:
        return self.start(Nginx(self.root / "nginx", root=root))

    def blob_url(self, service: Service, image: Image) -> str:
        if isinstance(service, Nginx):
            return f"{service.url}/{image.layer.hex}"
        return f"{service.url}/v2/{image.repository}/blobs/{image.layer.digest}"

    def process_cpu(self, service: Service) -> float:
        """CPU seconds the service's processes (and their children) have used so far."""
        return cpu_seconds(service.pid)

    def manifest_url(self, service: Service, image: Image) -> str:
        return f"{service.url}/v2/{image.repository}/manifests/{image.tag}"


def cpu_seconds(pid: int) -> float:
    """CPU seconds, user and system, a process and its children have used so far."""
    total = 0.0
    for each in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_stored(proxy: Registry, digest: str, timeout: float = STORE_TIMEOUT) -> None:
    """Wait until the registry proxy has the blob in its own storage (it stores it behind)."""
    deadline = time.monotonic() + timeout
    while not proxy.has_blob(digest):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the registry proxy did not store {digest} in {timeout:.0f} s")
        time.sleep(0.1)


def supports_workers(mirror_executable: str) -> bool:
    """Whether ``mirror serve`` has a ``--workers`` flag yet."""
    result = subprocess.run(
        [mirror_executable, "serve", "--help"], capture_output=True, timeout=60, check=False
    )
    return "--workers" in result.stdout.decode(errors="replace")


def cpu_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks of the machine so far, from /proc/stat: steal is the time the
    VM's host gave the CPUs to someone else, which slows every figure measured meanwhile."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    steal = fields[7] if len(fields) > 7 else 0  # user nice system idle iowait irq softirq steal
    return steal, sum(fields[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the CPU time between two ``cpu_ticks()`` that was stolen."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0
