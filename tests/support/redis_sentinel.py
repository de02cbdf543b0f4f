"""Redis as a site runs it to survive losing the master: a master, a replica and three
Redis Sentinels (``redis-server FILE --sentinel``), all on loopback, stopped by their PIDs."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.support.daemon import terminate
from tests.support.realregistry import free_port
from tests.support.redis_server import RedisServer

SERVICE = "mymaster"
READY_TIMEOUT = 30.0
# Small, so that a failover takes seconds: the master is "down" after 1 s without an answer.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelGroup:
    """`with SentinelGroup() as group:` runs the five processes; ``group.url()`` names them."""

    def __init__(self, binary: str = "redis-server", *, sentinels: int = 3) -> None:
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.master = RedisServer(binary)
        self.replica = RedisServer(binary)
        self.sentinel_ports: list[int] = []
        self._count = sentinels
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def start(self) -> None:
        self.master.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for number in range(self._count):
            self._start_sentinel(number)
        self._wait_ready()

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    address = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def wait_for_new_master(self, old_port: int, timeout: float = READY_TIMEOUT) -> int:
        """Wait until every sentinel names a master other than ``old_port``; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            named = {self._master_named_by(port) for port in self.sentinel_ports}
            if len(named) == 1 and None not in named and old_port not in named:
                port = named.pop()
                assert port is not None
                if _role(port) == "master":
                    return port
            time.sleep(0.1)
        raise AssertionError(f"no sentinel failover within {timeout} s: {self._logs()}")

    def wait_for_role(self, port: int, role: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the server on ``port`` is a ``master`` or a ``slave`` (ROLE's words)."""
        deadline = time.monotonic() + timeout
        while _role(port) != role:
            if time.monotonic() > deadline:
                raise AssertionError(f"{port} is no {role} after {timeout} s: {self._logs()}")
            time.sleep(0.1)

    def _master_named_by(self, port: int) -> int | None:
        try:
            with redis.Redis(port=port, socket_timeout=1) as client:
                address = client.sentinel_get_master_addr_by_name(SERVICE)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def _start_sentinel(self, number: int) -> None:
        for _ in range(3):  # another process may take the free port first
            port = free_port()
            config = self.directory / f"sentinel-{number}.conf"
            config.write_text(  # the sentinel rewrites its file, so one each
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"logfile {self.directory / f'sentinel-{number}.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            )
            process = subprocess.Popen(
                [self.binary, str(config), "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            if _wait_ping(port, process):
                self._sentinels.append(process)
                self.sentinel_ports.append(port)
                return
            terminate(process)
        raise RuntimeError(f"redis sentinel did not start: {self._logs()}")

    def _wait_ready(self) -> None:
        """Every sentinel sees the replica and the other sentinels (else no quorum to fail
        over with), and the replica has the master's data."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._sentinels_agree() and _replica_in_sync(self.replica.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis sentinels did not see each other: {self._logs()}")

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    state = client.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < self._count - 1:
                return False
        return True

    def _logs(self) -> str:
        return "\n".join(
            f"{path.name}: {path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.directory.glob("*.log"))
        )

    def close(self) -> None:
        for process in self._sentinels:
            terminate(process)
        self._sentinels.clear()
        self.replica.close()
        self.master.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _wait_ping(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with redis.Redis(port=port, socket_timeout=1) as client:
                if client.ping():
                    return True
        except redis.RedisError:
            time.sleep(0.05)
    return False


def _role(port: int) -> str | None:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            role = client.execute_command("ROLE")
    except redis.RedisError:
        return None
    name = role[0]
    return name.decode() if isinstance(name, bytes) else str(name)


def _replica_in_sync(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            info = client.info("replication")
    except redis.RedisError:
        return False
    return bool(info.get("master_link_status") == "up")
