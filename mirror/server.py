"""Run one mirror process: the app on its port, with structured logs."""

from __future__ import annotations

from aiohttp import web

from mirror.app import create_app
from mirror.config import Settings
from mirror.logs import configure
from mirror.routes.middleware import AccessLogger


def serve_one(settings: Settings, *, reuse_port: bool = False) -> None:
    configure(settings.log_level, settings.log_format)
    web.run_app(
        create_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        access_log_class=AccessLogger,
        reuse_port=reuse_port or None,
        print=None,
    )
