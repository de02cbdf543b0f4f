"""The access log's own lines: one JSON object per line, whatever a client sends."""

from __future__ import annotations

import json
import os
from pathlib import Path

from structlog.testing import capture_logs

from mirror.logs import MAX_LOGGED, MAX_LOGGED_PATH, AccessLog


def lines_of(log: AccessLog, path: Path) -> list[dict[str, object]]:
    log.flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


def open_log(tmp_path: Path) -> tuple[AccessLog, Path]:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = AccessLog()
    log.configure(enabled=True, fast=True, fd=fd)
    return log, path


def test_client_input_is_escaped_and_cut_short_but_a_path_the_api_can_have_is_kept_whole(
    tmp_path: Path,
) -> None:
    log, path = open_log(tmp_path)
    hostile = 'evil"\n\\agent\u2028é' * 1000
    long_path = "/v2/" + "a/" * 150 + "manifests/latest"
    for _ in range(2):  # the second time from the remembered escapes
        log.request("id-1", "GET", long_path, 200, 10, 1.234, "hit", hostile, "::1", None, hostile)
    log.request("id-2", "GET", hostile, 404, 0, 0.5, None, None, None, "bob", None)
    first, second, third = lines_of(log, path)
    assert first == second | {"timestamp": first["timestamp"]}
    assert first["path"] == long_path
    assert first["user_agent"] == hostile[:MAX_LOGGED] + "..."
    assert first["ns"] == hostile[:MAX_LOGGED] + "..."
    assert first["duration_ms"] == 1.23
    assert (third["ns"], third["user_agent"], third["client"], third["cache"]) == (None,) * 4
    assert third["user"] == "bob"
    assert len(path.read_text().splitlines()) == 3


def test_path_client_and_user_are_cut_short_too(tmp_path: Path) -> None:
    """A request line of 8 KiB, or a long user name, must not become a line of 8 KiB."""
    log, path = open_log(tmp_path)
    hostile = 'evil"\n' * 2000
    log.request("id-1", "GET", hostile, 404, 0, 0.5, None, None, hostile, hostile, hostile)
    log.request("id-2", "GET", "/v2/" + hostile, 404, 0, 0.5, None, None, None, None, None)
    log.fast = False  # on a terminal: the same fields through structlog
    with capture_logs() as captured:
        log.request("id-3", "GET", hostile, 404, 0, 0.5, None, None, hostile, hostile, hostile)
    for line in [*lines_of(log, path)[:1], *captured]:
        assert line["path"] == hostile[:MAX_LOGGED_PATH] + "..."
        assert line["client"] == hostile[:MAX_LOGGED] + "..."
        assert line["user"] == hostile[:MAX_LOGGED] + "..."
        assert line["user_agent"] == hostile[:MAX_LOGGED] + "..."
    assert lines_of(log, path)[1]["path"] == ("/v2/" + hostile)[:MAX_LOGGED_PATH] + "..."
    assert len("/v2/") + 255 + len("/manifests/") + 128 <= MAX_LOGGED_PATH  # name, tag


def test_lines_keep_the_order_of_the_requests_across_writes(tmp_path: Path) -> None:
    log, path = open_log(tmp_path)
    for number in range(1000):
        log.request(
            f"id-{number}",
            "GET",
            f"/v2/x/blobs/{number}",
            200,
            number,
            0.1,
            "hit",
            "docker.io",
            "127.0.0.1",
            None,
            "ua",
        )
    ids = [line["request_id"] for line in lines_of(log, path)]
    assert ids == [f"id-{number}" for number in range(1000)]


def test_durations_are_written_in_milliseconds_to_two_places(tmp_path: Path) -> None:
    log, path = open_log(tmp_path)
    durations = [0.0, 0.004, 0.006, 0.35, 1.0, 1.234, 99.999, 12345.678, 0.35]
    for number, duration in enumerate(durations):
        log.request(f"id-{number}", "GET", "/v2/", 200, 0, duration, None, None, None, None, None)
    written = [line["duration_ms"] for line in lines_of(log, path)]
    assert written == [0.0, 0.0, 0.01, 0.35, 1.0, 1.23, 100.0, 12345.68, 0.35]
    text = path.read_text()
    assert '"duration_ms": 0.01,' in text
    assert '"duration_ms": 12345.68,' in text
