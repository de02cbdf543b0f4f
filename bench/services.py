"""The programs the benchmark drives, each on a free loopback port, each stopped by its PID.

- ``Registry``: Debian's docker-registry (CNCF distribution 2.8), either the upstream holding
  the test images or, with ``proxy_of``, the peer pull-through cache. Its access log (one line
  per request, written when the response is done) is how upstream requests are counted.
- ``Mirror``: ``mirror serve`` as users start it.
- ``Nginx``: nginx with sendfile on, serving the large blob straight from disk.

Every service runs in its own session, so a Ctrl-C reaches only the benchmark, which then stops
them in order; descendants (nginx workers, mirror workers) are found through /proc and
stopped by PID too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3
POLL_INTERVAL = 0.05


def free_port() -> int:
    """A port free right now; racy by nature, so ``Service.start`` retries on a lost race."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status a GET of ``url`` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first, read from /proc."""
    found: list[int] = []
    pending = [pid]
    for _ in range(10_000):  # bounded: a process tree is never this large
        if not pending:
            break
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in task.read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found


class Service:
    """One long-running program on a free loopback port; subclasses say how to run it."""

    name = "service"
    ready_path = "/"
    cwd: Path | None = None  # where the command runs; None: the benchmark's own

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write whatever config the command needs; called once per start attempt."""

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.stderr.log"

    def start(self) -> None:
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            self.prepare()
            if self._spawn_and_wait():
                return
        raise RuntimeError(f"{self.name} did not start: {self._tail(self.stderr_path)}")

    def _spawn_and_wait(self) -> bool:
        with self.stdout_path.open("ab") as stdout, self.stderr_path.open("ab") as stderr:
            self._process = subprocess.Popen(
                self.command(), stdout=stdout, stderr=stderr, start_new_session=True, cwd=self.cwd
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False  # most likely lost the race for the port
            if http_status(self.url + self.ready_path) is not None:
                return True
            time.sleep(POLL_INTERVAL)
        self.stop()
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        below = descendants(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _tail(path: Path, size: int = 2000) -> str:
        return path.read_text(errors="replace")[-size:] if path.exists() else ""


_REGISTRY_CONFIG = """\
version: 0.1
storage: {{filesystem: {{rootdirectory: {root}}}, delete: {{enabled: true}}}}
http: {{addr: 127.0.0.1:{port}}}
log: {{level: error, accesslog: {{disabled: false}}}}
"""


class Registry(Service):
    """docker-registry with filesystem storage; a pull-through proxy when ``proxy_of`` is set."""

    ready_path = "/v2/"

    def __init__(self, workdir: Path, name: str, *, proxy_of: str | None = None) -> None:
        super().__init__(workdir)
        self.name = name
        self.proxy_of = proxy_of
        self.root = workdir / "storage"

    def prepare(self) -> None:
        config = _REGISTRY_CONFIG.format(root=self.root, port=self.port)
        if self.proxy_of is not None:
            config += f"proxy: {{remoteurl: {self.proxy_of}}}\n"
        (self.workdir / "config.yml").write_text(config)

    def command(self) -> list[str]:
        return ["docker-registry", "serve", str(self.workdir / "config.yml")]

    @property
    def access_log(self) -> Path:
        return self.stdout_path

    def has_blob(self, digest: str) -> bool:
        algorithm, hex_digest = digest.split(":", 1)
        blobs = self.root / "docker" / "registry" / "v2" / "blobs"
        return (blobs / algorithm / hex_digest[:2] / hex_digest / "data").exists()


class Mirror(Service):
    """``mirror serve`` on one data dir, as a user runs it: the defaults (access log on,
    uvloop where installed), apart from ``extra`` options a figure compares against."""

    name = "mirror"
    ready_path = "/v2/"

    def __init__(
        self,
        workdir: Path,
        *,
        executable: str,
        upstream: str,
        workers: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        super().__init__(workdir)
        self.executable = executable
        self.upstream = upstream
        self.workers = workers
        self.extra = extra
        self.data_dir = workdir / "data"

    def command(self) -> list[str]:
        command = [self.executable, "serve", "--listen", self.host]
        command += ["--data-dir", str(self.data_dir), "--upstream", self.upstream]
        command += list(self.extra)
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        return command

    def blob_path(self, digest: str) -> Path:
        algorithm, hex_digest = digest.split(":", 1)
        return self.data_dir / "blobs" / algorithm / hex_digest[:2] / hex_digest


_NGINX_CONFIG = """\
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


class Nginx(Service):
    """nginx, one worker (the mirror runs one process too), sendfile on, files under ``root``."""

    name = "nginx"

    def __init__(self, workdir: Path, *, root: Path) -> None:
        super().__init__(workdir)
        self.root = root

    def prepare(self) -> None:
        config = _NGINX_CONFIG.format(workdir=self.workdir, port=self.port, root=self.root)
        (self.workdir / "nginx.conf").write_text(config)

    def command(self) -> list[str]:
        config = str(self.workdir / "nginx.conf")
        error_log = str(self.workdir / "error.log")
        return [
            "nginx",
            "-p",
            str(self.workdir),
            "-e",
            error_log,
            "-c",
            config,
            "-g",
            "daemon off;",
        ]


class Throttle(Service):
    """``bench.throttle``: the upstream behind a link of ``rate_mib`` MiB/s, shared."""

    name = "throttle"
    ready_path = "/v2/"
    cwd = Path(__file__).resolve().parent.parent  # where ``-m bench.throttle`` is found

    def __init__(self, workdir: Path, *, target: Service, rate_mib: float) -> None:
        super().__init__(workdir)
        self.target = target
        self.rate_mib = rate_mib

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "bench.throttle", "--listen", self.host]
        return [*command, "--target", self.target.host, "--rate", f"{self.rate_mib:g}"]
