"""A real redis-server for the tests: loopback, no persistence, stopped by its PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlencode

from tests.support.daemon import terminate
from tests.support.realregistry import free_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisServer:
    """`with RedisServer() as server:` runs one redis-server in a temporary directory.

    ``stop()`` then ``start()`` brings it back on the same port (empty: nothing is saved),
    which is what a Redis restart looks like to a client.
    """

    def __init__(
        self,
        binary: str = "redis-server",
        *,
        password: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.password = password
        self.extra = tuple(extra)  # more options: --replicaof, --tls-port ...
        self.directory = Path(tempfile.mkdtemp(prefix="redis-server-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    def url(self, db: int = 0) -> str:
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def unix_url(self, db: int = 0) -> str:
        query = {"db": db} if self.password is None else {"db": db, "password": self.password}
        return f"unix://{self.socket_path}?{urlencode(query)}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, attempts: int = 3) -> None:
        """Start on a free port, or on the port of the previous run after a stop()."""
        for _ in range(attempts):
            if self._try_start(self.port or free_port()):
                return
            if self.port:
                time.sleep(0.2)  # the same port: give the old socket a moment
        raise RuntimeError(f"redis-server did not start: {self._log()}")

    def _try_start(self, port: int) -> bool:
        command = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password is not None:
            command += ["--requirepass", self.password]
        command += self.extra
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        if self._wait_ready(port):
            self.port = port
            return True
        self._terminate()
        return False

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False  # most likely lost the race for the port
            if _answers_ping(port):
                return True
            time.sleep(0.02)
        return False

    def _log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        terminate(process)

    def kill(self) -> None:
        """SIGKILL, as when the machine under it is lost: no goodbye to clients or replicas."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """Stop the server; the port and directory are kept for a later start()."""
        self._terminate()

    def close(self) -> None:
        self._terminate()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _answers_ping(port: int) -> bool:
    """Does something speaking RESP answer PING on the port (NOAUTH counts as an answer)?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            reply = connection.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))
