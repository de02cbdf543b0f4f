"""``mirror serve --workers N``: N processes serving one port.

The supervisor binds the port once and hands the listening socket to each worker, so
the kernel spreads connections over them while a port in use fails at once, like a
single process does, and a second supervisor cannot share the port unnoticed. Workers
share the data dir and coordinate through its lock files (or Redis). The supervisor
restarts a worker that dies, gives up (exit 1) when workers keep dying right after their
start, and stops them all on SIGTERM or SIGINT. Metrics are summed over the workers
through prometheus-client's multiprocess mode, in ``<data_dir>/run/metrics``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client import multiprocess

from mirror.config import Settings
from mirror.logs import ACCESS
from mirror.services.status import STARTED_FILE
from mirror.web.server import serve_one

log = structlog.get_logger(__name__)

# A worker that dies sooner than MIN_UPTIME after its start is restarted only after a
# pause, so a worker that cannot start does not spin; MAX_QUICK_DEATHS in a row end it all.
MIN_UPTIME = 5.0
RESTART_PAUSE = 1.0
MAX_QUICK_DEATHS = 5
STOP_TIMEOUT = 15.0
BACKLOG = 1024


def run_workers(settings: Settings, count: int) -> int:
    """Supervise ``count`` workers; the exit code. Raises OSError when the port is taken."""
    listener = bind(settings)
    metrics_dir = _fresh_metrics_dir(settings.data_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    context = multiprocessing.get_context("spawn")
    workers: dict[int, tuple[BaseProcess, float]] = {}
    stopping = False
    quick_deaths = 0

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for slot in range(count):
            workers[slot] = _start(context, settings, slot, listener)
        log.info(
            "workers_started", count=count, host=settings.listen_host, port=settings.listen_port
        )
        while not stopping:
            time.sleep(0.2)
            for slot, (process, started) in list(workers.items()):
                if process.is_alive() or stopping:
                    continue
                log.warning("worker_died", worker=slot, exitcode=process.exitcode)
                _remove_metrics_of(metrics_dir, process.pid)
                quick = time.monotonic() - started < MIN_UPTIME
                quick_deaths = quick_deaths + 1 if quick else 0
                if quick_deaths >= MAX_QUICK_DEATHS:
                    log.error("workers_keep_dying", deaths=quick_deaths, exitcode=process.exitcode)
                    return 1
                if quick:
                    time.sleep(RESTART_PAUSE)
                workers[slot] = _start(context, settings, slot, listener)
    finally:
        _stop_all([process for process, _ in workers.values()])
        listener.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def bind(settings: Settings) -> socket.socket:
    """The listening socket, bound without SO_REUSEPORT: one server per port."""
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    return socket.create_server(
        (settings.listen_host, settings.listen_port), family=family, backlog=BACKLOG
    )


def _fresh_metrics_dir(data_dir: Path) -> Path:
    directory = data_dir / "run" / "metrics"
    shutil.rmtree(directory, ignore_errors=True)  # files of a supervisor that was killed
    directory.mkdir(parents=True)
    (directory / STARTED_FILE).write_text(repr(time.time()))  # the status page's uptime
    return directory


def _start(
    context: multiprocessing.context.SpawnContext,
    settings: Settings,
    slot: int,
    listener: socket.socket,
) -> tuple[BaseProcess, float]:
    process = context.Process(
        target=_worker, args=(settings, slot, listener), name=f"mirror-worker-{slot}"
    )
    process.start()
    return process, time.monotonic()


def _worker(settings: Settings, slot: int, listener: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    structlog.contextvars.bind_contextvars(worker=slot)
    ACCESS.bind(worker=slot)
    serve_one(settings, sock=listener, stop_signals=(signal.SIGTERM,))


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


def _remove_metrics_of(directory: Path, pid: int | None) -> None:
    if pid is not None:
        # prometheus-client ships without annotations for this function.
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
