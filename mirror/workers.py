"""``mirror serve --workers N``: N processes serving one port.

Each worker binds the port with SO_REUSEPORT, so the kernel spreads connections over
them; they share the data dir and coordinate through its lock files (or Redis). The
parent only supervises: it restarts a worker that dies and stops them all on SIGTERM
or SIGINT. Metrics are summed over the workers through prometheus-client's
multiprocess mode, in a directory of the parent's.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog
from prometheus_client import multiprocess

from mirror.config import Settings
from mirror.server import serve_one

log = structlog.get_logger(__name__)

# A worker that dies sooner than this after its start is restarted only after a pause,
# so a worker that cannot start does not spin.
MIN_UPTIME = 5.0
STOP_TIMEOUT = 15.0


def run_workers(settings: Settings, count: int) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="mirror-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    workers: dict[int, tuple[BaseProcess, float]] = {}
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for slot in range(count):
            workers[slot] = _start(context, settings, slot)
        log.info("workers_started", count=count, port=settings.listen_port)
        while not stopping:
            time.sleep(0.2)
            for slot, (process, started) in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                log.warning("worker_died", worker=slot, exitcode=process.exitcode)
                _remove_metrics_of(metrics_dir, process.pid)
                if time.monotonic() - started < MIN_UPTIME:
                    time.sleep(MIN_UPTIME)
                workers[slot] = _start(context, settings, slot)
    finally:
        _stop_all([process for process, _ in workers.values()])
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _start(
    context: multiprocessing.context.SpawnContext, settings: Settings, slot: int
) -> tuple[BaseProcess, float]:
    process = context.Process(target=_worker, args=(settings, slot), name=f"mirror-worker-{slot}")
    process.start()
    return process, time.monotonic()


def _worker(settings: Settings, slot: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    structlog.contextvars.bind_contextvars(worker=slot)
    serve_one(settings, reuse_port=True)


def _stop_all(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0.1))
        if process.is_alive():
            process.kill()
            process.join()


def _remove_metrics_of(directory: str, pid: int | None) -> None:
    if pid is not None:
        # prometheus-client ships without annotations for this function.
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
