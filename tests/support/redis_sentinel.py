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
import trustme

from tests.support.daemon import terminate
from tests.support.realregistry import free_port
from tests.support.redis_server import RedisServer

SERVICE = "mymaster"
READY_TIMEOUT = 30.0
# Small, so that a failover takes seconds: the master is "down" after 1 s without an answer.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelGroup:
    """`with SentinelGroup() as group:` runs the five processes; ``group.url()`` names them.

    With ``tls``, every process also has a TLS port (certificates from a CA made here, in
    ``ca_file``) and they speak TLS among themselves, so the sentinels name TLS ports and
    ``url()`` is a ``rediss+sentinel://`` one. The ports this class hands out are always the
    plain ones, for the tests' own checks.
    """

    def __init__(
        self, binary: str = "redis-server", *, sentinels: int = 3, tls: bool = False
    ) -> None:
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.master = RedisServer(binary)
        self.replica = RedisServer(binary)
        self.sentinel_ports: list[int] = []
        self._count = sentinels
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self.ca_file = self.directory / "ca.pem"
        self._tls_options = _certificates(self.directory) if tls else ()
        self._tls_ports: dict[int, int] = {}  # plain port -> TLS port, for each process

    def url(self, db: int = 0) -> str:
        scheme = "rediss+sentinel" if self._tls_options else "redis+sentinel"
        ports = (self._announced(port) for port in self.sentinel_ports)
        hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
        return f"{scheme}://{hosts}/{SERVICE}/{db}"

    def start(self) -> None:
        self._start_server(self.master)
        self._start_server(
            self.replica, "--replicaof", "127.0.0.1", self._announced(self.master.port)
        )
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
                return self._plain(int(address[1]))
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
        return self._plain(int(address[1])) if address else None

    def _start_server(self, server: RedisServer, *options: str | int) -> None:
        if self._tls_options:
            tls_port = free_port()
            options = (*options, "--tls-port", tls_port, *self._tls_options)
        server.extra = tuple(str(option) for option in options)
        server.start()
        if self._tls_options:
            self._tls_ports[server.port] = tls_port

    def _announced(self, port: int) -> int:
        """The port the processes name each other by."""
        return self._tls_ports.get(port, port)

    def _plain(self, announced: int) -> int:
        plain = {tls: plain for plain, tls in self._tls_ports.items()}
        return plain.get(announced, announced)

    def _start_sentinel(self, number: int) -> None:
        for _ in range(3):  # another process may take the free port first
            port, tls_port = free_port(), free_port()
            tls = "".join(
                f"{name.removeprefix('--')} {value}\n"
                for name, value in zip(self._tls_options[::2], self._tls_options[1::2], strict=True)
            )
            config = self.directory / f"sentinel-{number}.conf"
            config.write_text(  # the sentinel rewrites its file, so one each
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"logfile {self.directory / f'sentinel-{number}.log'}\n"
                + (f"tls-port {tls_port}\n{tls}" if tls else "")
                + f"sentinel monitor {SERVICE} 127.0.0.1 {self._announced(self.master.port)} 2\n"
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
                if tls:
                    self._tls_ports[port] = tls_port
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


def _certificates(directory: Path) -> tuple[str, ...]:
    """A CA (``ca.pem``) and a certificate for 127.0.0.1; the options that serve it."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    issued = ca.issue_cert("127.0.0.1", "localhost")
    issued.cert_chain_pems[0].write_to_path(str(directory / "redis.crt"))
    issued.private_key_pem.write_to_path(str(directory / "redis.key"))
    return (
        "--tls-cert-file", str(directory / "redis.crt"),
        "--tls-key-file", str(directory / "redis.key"),
        "--tls-ca-cert-file", str(directory / "ca.pem"),
        "--tls-auth-clients", "no",
        "--tls-replication", "yes",
    )  # fmt: skip


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
