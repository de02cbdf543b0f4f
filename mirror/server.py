"""Run one mirror process: the app on its port (or on a socket it is handed), with logs."""

from __future__ import annotations

import socket

from aiohttp import web

from mirror.app import create_app
from mirror.config import Settings
from mirror.logs import configure
from mirror.routes.middleware import AccessLogger


def serve_one(settings: Settings, *, sock: socket.socket | None = None) -> None:
    configure(settings.log_level, settings.log_format)
    web.run_app(
        create_app(settings),
        host=None if sock is not None else settings.listen_host,
        port=None if sock is not None else settings.listen_port,
        sock=sock,
        access_log_class=AccessLogger,
        print=None,
    )
