"""structlog set-up, and a throttle that keeps a repeating event to one line per interval.

JSON lines when not on a terminal, readable lines otherwise. Events that a client or an
outage can repeat thousands of times a second (a rejected request, an upstream failure, a
failed accept) go through :class:`LogThrottle`: the first occurrence of each key is logged,
the repeats within the interval are only counted, and the next line says how many were
suppressed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO, TypeVar

import structlog
from cachetools import LRUCache


def configure(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    ACCESS.configure(
        enabled=getattr(logging, level.upper()) <= logging.INFO, fast=use_json, fd=_fd(sys.stderr)
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_request_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write() per line: print() writes the line and its newline apart, so with
        # unbuffered output (PYTHONUNBUFFERED) the lines of --workers processes interleave.
        logger_factory=_OrderedLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio report through the standard library; route them to stderr too.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


# The id of the request being answered, for every line logged while answering it. Set by
# ``routes.middleware.answered``: one ContextVar.set per request, where binding through
# structlog costs several calls; read only when a line is logged.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def _add_request_id(
    logger: Any, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def _fd(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):  # a test's captured stream has none
        return None


class _OrderedLogger(structlog.WriteLogger):
    """structlog's writer, which first writes the access lines still waiting, so that the
    log keeps the order in which things happened."""

    def msg(self, message: str) -> None:
        ACCESS.flush()
        super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _OrderedLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _OrderedLogger:
        return _OrderedLogger(self._file)


# At most this many bytes per write(2): a write of up to PIPE_BUF (4096 on Linux) bytes to a
# pipe is atomic, so the lines of several --workers processes never cut into each other.
ACCESS_WRITE = 4096
# To a regular file (appends do not interleave there, whatever their size): fewer, larger.
ACCESS_WRITE_FILE = 64 * 1024
# How long a line may wait for others to share its write.
ACCESS_DELAY = 0.05
# Lines that wait, at most, to be written together.
ACCESS_LINES = 256
# Characters of a client-chosen value (user agent, ns, client, user) an access line carries.
MAX_LOGGED = 200
# ... and of a path: more than any path of the API (a 255-character name and a 128-character
# tag), less than the 8 KiB request line the HTTP parser lets through.
MAX_LOGGED_PATH = 1024
# Distinct strings remembered as already escaped, at most.
QUOTED_STRINGS = 4096


# An access line's fields as a request leaves them: the time in nanoseconds, the request id,
# the duration, then the rest of AccessLog.request's fields in their order. Those repeat from
# line to line (the same client pulling the same kind of thing), and are made text once for
# all the lines that share them. Made into a line when written.
_Fields = tuple[str, str, int, int, str | None, str | None, str | None, str | None, str | None]
_Entry = tuple[int, str | None, float, _Fields]
# Three digits of a number, for the microseconds of a timestamp: int to text costs more.
_DIGITS = tuple(f"{number:03d}" for number in range(1000))


class AccessLog:
    """The access log: one JSON line per request, with the fields and the form structlog's
    JSON lines have, made by hand and written several lines a write.

    Through structlog a line costs about as much as answering a cached manifest; made here
    it costs a tenth of that. A request leaves only its fields (``request``); they become
    lines together when written, up to ``ACCESS_LINES`` of them or ``ACCESS_DELAY`` after
    the first: the fields that repeat from line to line (all but the id, the duration and
    the time) are made text once for every line that has them, a client-chosen string seen
    before is not escaped again (json's C encoder does it the first time), the timestamp's
    seconds are formatted once a second, and the
    lines share one write(2) of at most ``ACCESS_WRITE`` bytes (to a pipe:
    atomic, so workers' lines never cut into each other; to a file, up to
    ``ACCESS_WRITE_FILE``, where appends do not interleave anyway). Any other log
    line first writes those waiting, so the log stays in order. On a terminal (console
    format) the lines go through structlog like everything else.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.fast = False
        self._fd: int | None = None
        self._pending: list[_Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._bound = ""  # fields on every line of this process, written once
        self._limit = ACCESS_WRITE
        self._fallback = structlog.get_logger("mirror.access")
        # Strings of recent lines as JSON strings: paths (and cache states), cut at
        # MAX_LOGGED_PATH; ns, addresses, users and user agents, cut at MAX_LOGGED.
        self._quoted: dict[str | None, str] = {None: "null"}
        self._clipped: dict[str | None, str] = {None: "null"}
        # The fields of recent lines as the text around the duration, and durations (in
        # hundredths of a millisecond) as text.
        self._fields: dict[_Fields, tuple[str, str]] = {}
        self._durations: dict[int, str] = {}

    def configure(self, *, enabled: bool, fast: bool, fd: int | None) -> None:
        self.flush()
        self.enabled, self.fast, self._fd = enabled, fast and fd is not None, fd
        self._limit = ACCESS_WRITE
        with contextlib.suppress(OSError):
            if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
                self._limit = ACCESS_WRITE_FILE

    def bind(self, **fields: Any) -> None:
        """Fields every line of this process carries (``worker`` with --workers)."""
        self._bound += "".join(f'"{key}": {json.dumps(value)}, ' for key, value in fields.items())

    def request(  # noqa: PLR0917 (once per request: positional arguments cost the least)
        self,
        request_id: str | None,
        method: str,
        path: str,
        status: int,
        sent: int,
        duration_ms: float,
        cache: str | None,
        ns: str | None,
        client: str | None,
        user: str | None,
        user_agent: str | None,
    ) -> None:
        """One request's line, with its fields in this order. ``request_id``, ``method``
        and ``cache`` are the mirror's own or checked by the HTTP parser; the rest is client
        input, cut to ``MAX_LOGGED`` characters (the path to ``MAX_LOGGED_PATH``) and
        escaped. Called on every request, so it calls nothing it can avoid: a string
        already seen is escaped (and cut) once."""
        if not self.fast:
            self._fallback.info(
                "request",
                request_id=request_id,
                method=method,
                path=clip(path, MAX_LOGGED_PATH),
                status=status,
                bytes=sent,
                duration_ms=round(duration_ms, 2),
                cache=cache,
                ns=clip(ns),
                client=clip(client),
                user=clip(user),
                user_agent=clip(user_agent),
            )
            return
        self._pending.append(
            (
                time.time_ns(),
                request_id,
                duration_ms,
                (method, path, status, sent, cache, ns, client, user, user_agent),
            )
        )
        if len(self._pending) >= ACCESS_LINES:
            self.flush()
        elif self._timer is None:
            with contextlib.suppress(RuntimeError):  # no loop: the next line or exit writes
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(ACCESS_DELAY, self.flush)

    def _line(self, entry: _Entry) -> str:
        stamp, request_id, duration_ms, fields = entry
        second, micro = divmod(stamp // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        before, after = self._fields.get(fields) or self._made_fields(fields)
        hundredths = int(duration_ms * 100 + 0.5)
        duration = self._durations.get(hundredths) or self._duration(hundredths)
        quoted_id = "null" if request_id is None else f'"{request_id}"'  # unique: not kept
        micros = f"{_DIGITS[micro // 1000]}{_DIGITS[micro % 1000]}"
        return (
            f'{{{self._bound}"request_id": {quoted_id}, {before}"duration_ms": {duration}, '
            f'{after}"timestamp": "{self._stamp}.{micros}Z"}}\n'
        )

    def _made_fields(self, fields: _Fields) -> tuple[str, str]:
        """The text of a line's ``fields`` before and after its duration, remembered for the
        next lines with the same fields."""
        method, path, status, sent, cache, ns, client, user, user_agent = fields
        quoted, clipped = self._quoted.get, self._clipped.get
        text = (
            f'"method": "{method}", "path": {quoted(path) or self._quote(path)}, '
            f'"status": {status}, "bytes": {sent}, ',
            f'"cache": {quoted(cache) or self._quote(cache)}, '
            f'"ns": {clipped(ns) or self._clip(ns)}, '
            f'"client": {clipped(client) or self._clip(client)}, '
            f'"user": {clipped(user) or self._clip(user)}, '
            f'"user_agent": {clipped(user_agent) or self._clip(user_agent)}, '
            f'"event": "request", "level": "info", ',
        )
        return _keep(self._fields, fields, text)

    def _duration(self, hundredths: int) -> str:
        """Milliseconds to two places, remembered."""
        return _keep(self._durations, hundredths, f"{hundredths // 100}.{hundredths % 100:02d}")

    def _quote(self, value: str | None) -> str:
        """A path (or the cache state) cut to ``MAX_LOGGED_PATH`` as a JSON string,
        remembered for the next lines."""
        return _remember(self._quoted, value, clip(value, MAX_LOGGED_PATH))

    def _clip(self, value: str | None) -> str:
        """``value`` cut short (``clip``) as a JSON string, remembered for the next lines."""
        return _remember(self._clipped, value, clip(value))

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._fd is None:
            return
        entries, self._pending = self._pending, []
        chunk: list[str] = []
        size = 0
        for line in map(self._line, entries):
            if size + len(line) > self._limit and chunk:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._write("".join(chunk))

    def _write(self, text: str) -> None:
        assert self._fd is not None
        data = text.encode()
        with contextlib.suppress(OSError):  # a closed stderr loses lines, not requests
            while data:
                data = data[os.write(self._fd, data) :]


_escape: Callable[[str], str] = encode_basestring_ascii  # a JSON string, quotes included


_K = TypeVar("_K")
_V = TypeVar("_V")


def _keep(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    """``value``, remembered under ``key`` in a cache of the access log's: at most
    ``QUOTED_STRINGS`` entries, a full one starting afresh."""
    if len(cache) >= QUOTED_STRINGS:
        cache.clear()
    cache[key] = value
    return value


def _remember(strings: dict[str | None, str], key: str | None, value: str | None) -> str:
    assert value is not None, "None is always remembered"
    quoted = _keep(strings, key, _escape(value))
    strings.setdefault(None, "null")  # None stays remembered when the cache starts afresh
    return quoted


def clip(value: str | None, limit: int = MAX_LOGGED) -> str | None:
    """Client input cut short: a header of 8 KiB must not become a line of 8 KiB."""
    return value if value is None or len(value) <= limit else value[:limit] + "..."


ACCESS = AccessLog()
atexit.register(ACCESS.flush)


# Keys remembered at once; a client inventing keys cannot grow the throttle without bound.
MAX_THROTTLE_KEYS = 1024


class LogThrottle:
    """Decides, per key, whether an event is logged now: at most once per ``interval``."""

    def __init__(
        self, interval: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        # key -> (time of the last line logged, occurrences suppressed since)
        self._seen: LRUCache[Hashable, tuple[float, int]] = LRUCache(maxsize=MAX_THROTTLE_KEYS)

    def admit(self, key: Hashable) -> int | None:
        """None when this occurrence is to be suppressed; otherwise how many were suppressed
        since the last line for ``key`` (to log as ``suppressed=``)."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        return 0 if last is None else last[1]
