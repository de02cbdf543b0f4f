"""nginx from the distribution as the load balancer in front of mirror replicas: its own
config and files in a temporary directory, on a free loopback port, stopped by its PID.

The config is what the README asks of any load balancer: retry a GET on the other replica
after a connection error or a 502/503, no buffering of large blobs, timeouts above the
mirror's shutdown_grace, keep-alive connections to the replicas.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.support.daemon import terminate
from tests.support.realregistry import free_port

START_TIMEOUT = 10.0

_CONFIG = """\
{user}worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream mirror {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mirror;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
        }}
    }}
}}
"""


class LoadBalancer:
    """``with LoadBalancer(binary, directory, [port, ...]) as nginx:`` balances over the
    replicas on those loopback ports; ``nginx.url`` is where clients go."""

    def __init__(self, binary: str, directory: Path, backends: list[int]) -> None:
        self.binary = binary
        self.directory = directory
        self.backends = backends
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        servers = "\n".join(
            # A replica that refused a connection is left alone for a second, then tried again.
            f"        server 127.0.0.1:{port} max_fails=1 fail_timeout=1s;"
            for port in self.backends
        )
        # As root, nginx's workers would switch to "nobody", who cannot enter the test's
        # temporary directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        config = self.directory / "nginx.conf"
        config.write_text(
            _CONFIG.format(user=user, directory=self.directory, servers=servers, port=self.port)
        )
        command = [self.binary, "-p", str(self.directory), "-e", str(self.directory / "error.log")]
        self._process = subprocess.Popen(
            [*command, "-c", str(config), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"nginx exited early:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        terminate(self._process)
        self._process = None

    def __enter__(self) -> LoadBalancer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
