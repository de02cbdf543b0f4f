"""Run real programs for tests: ``mirror serve`` as users start it, and skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.realregistry import free_port

START_TIMEOUT = 20.0
# Access lines wait up to 50 ms to share a write (mirror.logs.ACCESS_DELAY); a little more.
ACCESS_LINE_DELAY = 0.15
# How long a test waits for a log line before it gives up (not a timed assertion).
EVENT_WAIT = 60.0


def run_mirror(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m mirror ARGS`` to completion, without the caller's MIRROR_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


class MirrorProcess:
    """``python -m mirror serve`` on a free loopback port, stopped by its PID."""

    def __init__(
        self,
        data_dir: Path,
        upstream: str,
        *extra: str,
        env: dict[str, str] | None = None,
        name: str = "mirror",
        prefix: tuple[str, ...] = (),
        ca_file: Path | None = None,
        port: int = 0,
        quick_stop: bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.upstream = upstream
        self.extra = extra
        # Tests stop mirrors often: no pause before the port closes, unless a test asks.
        # A release from before shutdown_delay refuses the variable (quick_stop=False).
        quick = {"MIRROR_SHUTDOWN_DELAY": "0"} if quick_stop else {}
        self.env = {**quick, **(env or {})}
        self.prefix = prefix  # a command the mirror runs under, such as prlimit
        self.ca_file = ca_file  # the mirror serves HTTPS with a certificate this CA signed
        self.fixed_port = port  # 0: a free port each start; else this one (behind nginx)
        self.port = 0
        self.log_path = data_dir.parent / f"{data_dir.name}-{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file is not None else 'http'}://{self.host}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        self.port = self.fixed_port or free_port()
        command = [
            *self.prefix,
            sys.executable,
            "-m",
            "mirror",
            "serve",
            "--listen",
            self.host,
            "--data-dir",
            str(self.data_dir),
            "--upstream",
            self.upstream,
            "--log-format",
            "json",
            *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**env, **self.env}
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"mirror exited early:\n{self.log()}")
            context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=context):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"mirror did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_log(self) -> list[dict[str, object]]:
        if self._process is not None:
            time.sleep(ACCESS_LINE_DELAY)  # a running mirror writes access lines in batches
        lines = (json.loads(line) for line in self.log().splitlines() if line.startswith("{"))
        return [line for line in lines if line.get("event") == "request"]

    def kill(self) -> None:
        """SIGKILL: what a crash or the OOM killer does."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)
            self._process = None

    def send_signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit code, once it has exited; raises TimeoutExpired if it has not by then."""
        assert self._process is not None
        code = self._process.wait(timeout=timeout)
        self._process = None
        return code

    async def wait_for_event(self, event: str, *, count: int = 1) -> dict[str, object]:
        """The first log line of ``event``, once the process (its workers) wrote ``count``."""
        deadline = time.monotonic() + EVENT_WAIT
        while time.monotonic() < deadline:
            lines = (json.loads(line) for line in self.log().splitlines() if line.startswith("{"))
            found = [entry for entry in lines if entry.get("event") == event]
            if len(found) >= count:
                return dict(found[0])
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event} in the log:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def __enter__(self) -> MirrorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def skopeo_copy(
    source: str, destination: Path, *, all_platforms: bool = True, extra: tuple[str, ...] = ()
) -> None:
    """``skopeo copy [--all] docker://SOURCE dir:DESTINATION``; ``dir:`` keeps manifests as-is."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "skopeo",
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        *(["--all"] if all_platforms else []),
        *extra,
        f"docker://{source}",
        f"dir:{destination}",
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=300)
    if process.returncode != 0:
        raise RuntimeError(f"skopeo copy {source} failed: {stderr.decode(errors='replace')}")


def dir_manifest_digest(directory: Path) -> str:
    """The digest of the top manifest skopeo wrote to a ``dir:`` destination."""
    return "sha256:" + hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


def dir_blobs_verified(directory: Path) -> int:
    """Check every blob skopeo wrote against its file name; return how many there are."""
    count = 0
    for path in directory.iterdir():
        name = path.name
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == name
            count += 1
    return count
