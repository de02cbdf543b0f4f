"""Real container clients pulling through the mirror: containerd with ctr, dockerd, podman.

Each one lives under its own temporary directory, listens only on unix sockets, and is
stopped by its PID. The daemons take seconds to start, so tests start them once per session.
Every command runs with a timeout, and every failure carries the client's own log, because
"exit status 1" says nothing about why a pull went wrong.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.daemon import terminate

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 30.0
PULL_TIMEOUT = 90.0
LOG_TAIL = 6000
# Unix socket paths are limited to 108 bytes, and dockerd puts hashed names below its
# exec-root, so the client directories must live under a short path.
_SHORT_ENOUGH = 24
DOCKER_HUB = "https://registry-1.docker.io"
# dockerd creates its plugin-discovery directory there whatever its flags say.
_PLUGIN_DIR = Path("/run/docker/plugins")
NAMESPACE = "mirror-tests"  # ctr's containerd namespace; dockerd uses its own ("moby")


class ClientError(RuntimeError):
    """A client did not start, or one of its commands failed or hung."""


def short_tempdir(prefix: str) -> Path:
    base = tempfile.gettempdir()
    if len(base) > _SHORT_ENOUGH:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def _tail(path: Path) -> str:
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace")
    return text[-LOG_TAIL:] if len(text) > LOG_TAIL else text


def run(
    command: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> str:
    """Run `command`; its stdout, or a ClientError with its output and the client's log."""
    shown = " ".join(command)
    try:
        result = subprocess.run(
            list(command), capture_output=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = _decode(exc.stdout) + _decode(exc.stderr)
        raise ClientError(
            f"{shown} did not finish in {timeout:.0f} s:\n{output}{_log_note(log)}"
        ) from None
    if result.returncode != 0:
        output = _decode(result.stdout) + _decode(result.stderr)
        raise ClientError(
            f"{shown} failed with exit code {result.returncode}:\n{output}{_log_note(log)}"
        )
    return _decode(result.stdout)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _log_note(log: Path | None) -> str:
    return "" if log is None else f"\n--- {log} ---\n{_tail(log)}"


class _Daemon:
    """A long-running client process writing to one log file, stopped by its PID."""

    name = "daemon"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log_path = directory / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None, f"{self.name} is not running"
        return self._process.pid

    def _spawn(self, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it mid-test
            )

    def _wait_until(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise ClientError(f"{self.name} exited with code {code}:\n{_tail(self.log_path)}")
            if ready():
                return
            time.sleep(0.1)
        self._terminate()
        raise ClientError(
            f"{self.name} was not ready after {START_TIMEOUT:.0f} s:\n{_tail(self.log_path)}"
        )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        terminate(process, STOP_TIMEOUT)

    def log(self) -> str:
        return _tail(self.log_path)


class Containerd(_Daemon):
    """containerd with its own root, state and socket, the CRI plugin disabled."""

    name = "containerd"

    def __init__(
        self, directory: Path, binary: str = "containerd", ctr_binary: str = "ctr"
    ) -> None:
        super().__init__(directory)
        self.binary = binary
        self.ctr_binary = ctr_binary
        self.socket = directory / "containerd.sock"

    def start(self) -> None:
        config = self.directory / "config.toml"
        self.directory.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "version = 2\n"
            f'root = "{self.directory / "root"}"\n'
            f'state = "{self.directory / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.directory / "opt"}"\n'
        )
        self._spawn([self.binary, "--config", str(config), "--log-level", "info"])
        self._wait_until(self._answers)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.ctr("version", timeout=5)
        except ClientError:
            return False
        return True

    def stop(self) -> None:
        self._terminate()

    def ctr(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        command = [self.ctr_binary, "--address", str(self.socket), "--namespace", NAMESPACE]
        return run([*command, *args], timeout=timeout, log=self.log_path)

    def pull(self, reference: str, hosts_dir: Path, *, platform: str | None = None) -> str:
        """``ctr images pull --hosts-dir``; returns the digest of the image containerd recorded."""
        # The native snapshotter unpacks by copying, so it works on any file system (overlayfs
        # cannot stack on the overlay root of a CI container); the pull itself is the same.
        options = ["--hosts-dir", str(hosts_dir), "--snapshotter", "native"]
        options += ["--platform", platform] if platform else []
        self.ctr("images", "pull", *options, reference, timeout=PULL_TIMEOUT)
        return self.image_digest(reference)

    def image_digest(self, reference: str) -> str:
        # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS; SIZE holds a space, DIGEST does not.
        for line in self.ctr("images", "ls", f"name=={reference}").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return fields[2]
        raise ClientError(f"ctr does not list {reference} after pulling it")

    def remove_image(self, reference: str) -> None:
        self.ctr("images", "rm", "--sync", reference)


def write_hosts_toml(
    hosts_dir: Path, mirror_url: str, *, fallback: bool = True, registry: str = "docker.io"
) -> Path:
    """containerd's ``<hosts_dir>/docker.io/hosts.toml`` sending docker.io pulls to the mirror.

    With `fallback` Docker Hub stays the server and the mirror is tried first, as the README
    recommends. Without it the mirror is the only server; containerd 1.6 silently ignores a
    hosts.toml that has no ``[host]`` table, hence the empty one.
    """
    if fallback:
        text = (
            f'server = "{DOCKER_HUB if registry == "docker.io" else "https://" + registry}"\n\n'
            f'[host."{mirror_url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
    else:
        text = f'server = "{mirror_url}"\ncapabilities = ["pull", "resolve"]\n\n[host]\n'
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return hosts_dir


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


class Dockerd(_Daemon):
    """dockerd on a unix socket, reusing a running containerd; vfs storage, no networking.

    Its registry mirror is fixed at start-up, so the mirror must already be listening.
    """

    name = "dockerd"

    def __init__(
        self,
        directory: Path,
        containerd: Containerd,
        mirror_host: str,
        binary: str = "dockerd",
        docker_binary: str = "docker",
    ) -> None:
        super().__init__(directory)
        self.containerd = containerd
        self.mirror_host = mirror_host
        self.binary = binary
        self.docker_binary = docker_binary
        self.socket = directory / "docker.sock"
        # The CLI reads config.json (credential helpers!) from here, not from ~/.docker.
        self.env = {**os.environ, "DOCKER_CONFIG": str(directory / "cli")}
        self.env.pop("DOCKER_HOST", None)
        self._made_plugin_dir = False

    def start(self) -> None:
        self._made_plugin_dir = not _PLUGIN_DIR.parent.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        # A daemon.json of our own, so a machine's /etc/docker/daemon.json cannot leak in;
        # the trust key would otherwise be written to /etc/docker/key.json.
        config = self.directory / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.directory / "key.json")}))
        (self.directory / "cli").mkdir(exist_ok=True)
        command = [
            self.binary,
            "--config-file", str(config),
            "--registry-mirror", f"http://{self.mirror_host}",
            "--insecure-registry", self.mirror_host,
            "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            "--bridge=none", "--userland-proxy=false",
            "--storage-driver=vfs",
            "--data-root", str(self.directory / "data"),
            "--exec-root", str(self.directory / "exec"),
            "--host", f"unix://{self.socket}",
            "--pidfile", str(self.directory / "dockerd.pid"),
            "--containerd", str(self.containerd.socket),
        ]  # fmt: skip
        self._spawn(command, env=self.env)
        self._wait_until(self._answers)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        connection = _UnixHTTPConnection(self.socket)
        try:
            connection.request("GET", "/_ping")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        self._terminate()
        if self._made_plugin_dir:
            for empty in (_PLUGIN_DIR, _PLUGIN_DIR.parent):
                with contextlib.suppress(OSError):
                    empty.rmdir()

    def docker(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        command = [self.docker_binary, "--host", f"unix://{self.socket}", *args]
        return run(command, timeout=timeout, env=self.env, log=self.log_path)

    def pull(self, reference: str) -> str:
        """``docker pull``; returns the repository digest dockerd recorded for the image."""
        self.docker("pull", "--quiet", reference, timeout=PULL_TIMEOUT)
        return self.image_digest(reference)

    def image_digest(self, reference: str) -> str:
        found = self.docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference)
        digests: list[str] = json.loads(found)
        if not digests:
            raise ClientError(f"dockerd recorded no repository digest for {reference}")
        return digests[0].rpartition("@")[2]

    def remove_image(self, reference: str) -> None:
        self.docker("image", "rm", "--force", reference)


class Podman:
    """podman with every config file under one directory and the mirror in registries.conf.

    podman has no daemon: start() writes the configuration, stop() removes the storage.
    """

    def __init__(self, directory: Path, mirror_host: str, binary: str = "podman") -> None:
        self.directory = directory
        self.mirror_host = mirror_host
        self.binary = binary
        self.root = directory / "root"
        self.runroot = directory / "runroot"
        self.events_log = directory / "events.log"
        self.env: dict[str, str] = {}

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        files = {
            "registries.conf": (
                'unqualified-search-registries = ["docker.io"]\n\n'
                "[[registry]]\n"
                'prefix = "docker.io"\n'
                'location = "registry-1.docker.io"\n\n'
                "[[registry.mirror]]\n"
                f'location = "{self.mirror_host}"\n'
                "insecure = true\n"
            ),
            "storage.conf": (
                "[storage]\n"
                'driver = "vfs"\n'
                f'graphroot = "{self.root}"\n'
                f'runroot = "{self.runroot}"\n'
            ),
            "containers.conf": (
                "[engine]\n"
                'cgroup_manager = "cgroupfs"\n'
                'events_logger = "file"\n'
                f'events_logfile_path = "{self.events_log}"\n'
                f'tmp_dir = "{self.directory / "tmp"}"\n'
            ),
            "policy.json": json.dumps({"default": [{"type": "insecureAcceptAnything"}]}),
            # Empty credentials of our own; podman refuses an auth file that does not exist.
            "auth.json": json.dumps({"auths": {}}),
        }
        for name, text in files.items():
            (self.directory / name).write_text(text)
        self.env = {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(self.directory / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.directory / "storage.conf"),
            "CONTAINERS_CONF": str(self.directory / "containers.conf"),
            "REGISTRY_AUTH_FILE": str(self.directory / "auth.json"),
        }
        self.podman("version")

    def stop(self) -> None:
        """Nothing keeps running; the caller removes the directory."""

    def podman(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        command = [
            self.binary,
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--storage-driver", "vfs",
            *args,
        ]  # fmt: skip
        return run(command, timeout=timeout, env=self.env)

    def pull(self, reference: str, *, platform: str | None = None) -> str:
        """``podman pull``; returns the digest podman recorded for the image."""
        options = ["--platform", platform] if platform else []
        policy = ["--signature-policy", str(self.directory / "policy.json")]
        self.podman("pull", "--quiet", *policy, *options, reference, timeout=PULL_TIMEOUT)
        return self.image_digest(reference)

    def image_digest(self, reference: str) -> str:
        return self.podman("image", "inspect", "--format", "{{.Digest}}", reference).strip()

    def remove_image(self, reference: str) -> None:
        self.podman("image", "rm", "--force", reference)


def remove_tree(directory: Path) -> None:
    """Delete a client's directory, unless something is still mounted below it.

    Deleting through a leftover mount could reach whatever it exposes; better to leave the
    directory behind and say so.
    """
    prefix = str(directory.resolve()) + "/"
    mounts = Path("/proc/self/mountinfo")
    if mounts.exists():
        points = [line.split()[4] for line in mounts.read_text().splitlines()]
        if any(point.startswith(prefix) for point in points):
            warnings.warn(f"leaving {directory}: something is mounted below it", stacklevel=2)
            return
    shutil.rmtree(directory, ignore_errors=True)
