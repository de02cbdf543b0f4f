"""Debian's docker-registry (CNCF distribution 2.8) as a real upstream, filled with skopeo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.daemon import terminate
from tests.support.oci import ALL_MANIFEST_TYPES, Image, Index, write_oci_layout

_CONFIG = """\
version: 0.1
storage: {{filesystem: {{rootdirectory: {root}}}, delete: {{enabled: true}}}}
http: {{addr: 127.0.0.1:{port}}}
log: {{level: error, accesslog: {{disabled: true}}}}
"""
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
PUSH_TIMEOUT = 600.0


def free_port() -> int:
    # Racy by nature (the port is free only when we look), so start() retries.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RealRegistry:
    """`with RealRegistry() as registry:` runs one registry in a temporary directory."""

    def __init__(self, binary: str = "docker-registry", skopeo: str = "skopeo") -> None:
        self.binary = binary
        self.skopeo = skopeo
        self.directory = Path(tempfile.mkdtemp(prefix="real-registry-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, attempts: int = 3) -> None:
        for _ in range(attempts):
            if self._try_start():
                return
        raise RuntimeError(f"docker-registry did not start: {self._stderr()}")

    def _try_start(self) -> bool:
        self.port = free_port()
        config = self.directory / "config.yml"
        root = self.directory / "storage"
        config.write_text(_CONFIG.format(root=root, port=self.port))
        with (self.directory / "stderr.log").open("wb") as stderr:
            self._process = subprocess.Popen(
                [self.binary, "serve", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        if self._wait_ready():
            return True
        self._terminate()
        return False

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False  # most likely lost the race for the port
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        return False

    def _stderr(self) -> str:
        path = self.directory / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _terminate(self) -> None:
        process, self._process = self._process, None
        terminate(process)

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RealRegistry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def push(
        self,
        layout_dir: str | Path,
        tag: str,
        repo: str,
        *,
        all: bool = False,  # named after skopeo's --all, shadowing the builtin on purpose
        v2s2: bool = False,
    ) -> str:
        """Copy oci:LAYOUT_DIR:TAG to REPO:TAG here; returns the digest the registry serves.

        With v2s2 skopeo converts to Docker media types, so that digest differs from the
        OCI one that was written to the layout.
        """
        command = [self.skopeo, "--insecure-policy", "copy", "--quiet"]
        command += ["--all"] if all else []
        command += ["--format", "v2s2"] if v2s2 else []
        command += ["--dest-tls-verify=false", f"oci:{layout_dir}:{tag}"]
        command.append(f"docker://{self.host}/{repo}:{tag}")
        result = subprocess.run(command, capture_output=True, timeout=PUSH_TIMEOUT, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"skopeo copy failed: {result.stderr.decode(errors='replace')}")
        return self.get_manifest(repo, tag)[2]

    def push_image(
        self, image_or_index: Image | Index, repo: str, tag: str, *, v2s2: bool = False
    ) -> str:
        """Write a throw-away OCI layout for one image or index and push it; returns the digest."""
        layout = Path(tempfile.mkdtemp(prefix="layout-", dir=self.directory))
        try:
            write_oci_layout(layout, tag, image_or_index)
            return self.push(layout, tag, repo, all=isinstance(image_or_index, Index), v2s2=v2s2)
        finally:
            shutil.rmtree(layout, ignore_errors=True)

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, Docker-Content-Digest) of a manifest, accepting every type."""
        request = urllib.request.Request(f"{self.url}/v2/{repo}/manifests/{reference}")
        # distribution rewrites lists and refuses OCI types unless they are all accepted.
        request.add_header("Accept", ", ".join(ALL_MANIFEST_TYPES))
        with urllib.request.urlopen(request, timeout=30) as response:
            body: bytes = response.read()
            return body, response.headers["Content-Type"], response.headers["Docker-Content-Digest"]
