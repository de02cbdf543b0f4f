"""``mirror serve --workers N``: N processes serving one port.

The supervisor binds the port once and hands the listening socket to each worker, so
the kernel spreads connections over them while a port in use fails at once, like a
single process does, and a second supervisor cannot share the port unnoticed. Workers
share the data dir and coordinate through its lock files (or Redis). The supervisor
restarts a worker that dies, gives up (exit 1) when workers keep dying right after their
start, and on SIGTERM or SIGINT passes SIGTERM on to every worker, which then stops as a
single process does (``mirror.web.shutdown``); a second signal is passed on too. Metrics are
summed over the workers through prometheus-client's multiprocess mode, in
``<data_dir>/run/metrics``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import sys
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
# Beyond shutdown_delay + shutdown_grace, what a worker may take to close its engine.
STOP_MARGIN = 10.0
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

    signalled: set[int] = set()

    def stop(signum: int, frame: FrameType | None) -> None:
        # Passed on at once: every worker's /readyz answers 503 from the signal on. A
        # second signal passed on makes the workers, already stopping, stop at once.
        nonlocal stopping
        stopping = True
        signalled.update(_signal_all([process for process, _ in workers.values()]))

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
        # The workers' copies keep the port open until their shutdown_delay is over.
        listener.close()
        timeout = settings.shutdown_delay + settings.shutdown_grace + STOP_MARGIN
        processes = [process for process, _ in workers.values()]
        # Those the signal did not reach: giving up, an error, or one started meanwhile.
        _signal_all([process for process in processes if process.pid not in signalled])
        _join_all(processes, timeout)
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
    # A worker exiting 1 (``mirror.web.shutdown``) is started again like one that died.
    sys.exit(serve_one(settings, sock=listener, stop_signals=(signal.SIGTERM,)))


def _join_all(processes: list[BaseProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0.1))
        if process.is_alive():
            process.kill()
            process.join()


def _signal_all(processes: list[BaseProcess]) -> list[int]:
    """SIGTERM to those alive; their pids."""
    pids = [p.pid for p in processes if p.is_alive() and p.pid is not None]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it died just now
            os.kill(pid, signal.SIGTERM)
    return pids


def _remove_metrics_of(directory: Path, pid: int | None) -> None:
    if pid is not None:
        # prometheus-client ships without annotations for this function.
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
