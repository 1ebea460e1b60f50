"""Application wiring: make_app() builds the proxy and metrics apps; serve() runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from .attribution import Attributor
from .calibration import Calibration
from .config import Settings
from .metrics import Metrics
from .proxy import Proxy, RecordSink
from .state import SQLiteState, parse_state_url
from .tokens import Tokenizers, encoding_source

log = logging.getLogger("sidecar")

SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
READY_KEY = web.AppKey("ready", asyncio.Event)
# How often learned estimate factors are written to the state file (and at shutdown).
STATE_FLUSH_SECONDS = 5.0


def record_writer(target: str) -> tuple[RecordSink, Callable[[], None]]:
    """A sink writing one JSON line per request to stderr ('-'), a file, or nowhere ('off')."""
    if target == "off":
        return (lambda rec: None), (lambda: None)
    stream: TextIO
    if target == "-":
        stream, close = sys.stderr, (lambda: None)
    else:
        stream = open(target, "a", encoding="utf-8", buffering=1)
        close = stream.close

    def write(rec: dict[str, Any]) -> None:
        try:
            stream.write(orjson.dumps(rec).decode() + "\n")
        except (OSError, ValueError):
            log.warning("request record could not be written")

    return write, close


@dataclass(slots=True)
class Apps:
    proxy: web.Application
    metrics: web.Application
    registry: CollectorRegistry
    handler: Proxy


def make_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    tokenizers: Tokenizers | None = None,
    record_sink: RecordSink | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Apps:
    """Build both apps. Nothing is opened until the apps start (see cleanup_ctx)."""
    registry = registry if registry is not None else CollectorRegistry()
    tokenizers = tokenizers or Tokenizers()
    metrics = Metrics(registry, max_keys=settings.max_keys, max_teams=settings.max_teams,
                      max_models=settings.max_models)
    close_records: Callable[[], None] = lambda: None  # noqa: E731
    if record_sink is None:
        record_sink, close_records = record_writer(settings.records)
    proxy_app = web.Application(client_max_size=settings.max_request_body)
    ready = asyncio.Event()
    proxy_app[READY_KEY] = ready
    calibration = Calibration()

    async def state_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(
            None, SQLiteState, parse_state_url(settings.state))
        learned = await loop.run_in_executor(None, store.load_calibration)
        calibration.restore(learned)
        log.info("state %s: %d learned estimate factors", settings.state, len(learned))

        async def flush_forever() -> None:
            while True:
                await asyncio.sleep(STATE_FLUSH_SECONDS)
                if calibration.dirty:
                    await loop.run_in_executor(None, store.save_calibration,
                                               calibration.snapshot())

        flusher = asyncio.create_task(flush_forever(), name="sidecar-state-flush")
        yield
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await loop.run_in_executor(None, store.save_calibration, calibration.snapshot())
        await loop.run_in_executor(None, store.close)

    proxy_app.cleanup_ctx.append(state_ctx)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # Load tokenizers off the loop: the first load parses a few MB of vocabulary.
        await asyncio.get_running_loop().run_in_executor(None, tokenizers.preload)
        for name in ("o200k_base", "cl100k_base"):
            log.info("encoding %s loaded from %s", name, encoding_source(name))
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout,
                                        sock_connect=settings.connect_timeout,
                                        sock_read=settings.read_timeout)
        session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        app[SESSION_KEY] = session
        ready.set()
        yield
        ready.clear()
        await session.close()
        close_records()

    proxy_app.cleanup_ctx.append(session_ctx)
    handler = Proxy(
        settings,
        session_getter=lambda: proxy_app[SESSION_KEY],
        metrics=metrics,
        tokenizers=tokenizers,
        attributor=Attributor(settings.keys, settings.team_header, settings.key_hash_secret),
        calibration=calibration,
        record_sink=record_sink,
        clock=clock,
    )
    proxy_app.router.add_route("*", "/{tail:.*}", handler.handle)

    metrics_app = web.Application()

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    metrics_app.router.add_get("/metrics", metrics_view)
    metrics_app.router.add_get("/healthz", healthz)
    metrics_app.router.add_get("/readyz", readyz)
    return Apps(proxy_app, metrics_app, registry, handler)


def default_registry() -> CollectorRegistry:
    """A fresh registry with the process and platform collectors (RSS, CPU, fds)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


@dataclass(slots=True)
class Running:
    runners: list[web.AppRunner]
    proxy_port: int
    metrics_port: int

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


async def start(apps: Apps, settings: Settings, *, shutdown_timeout: float = 30.0) -> Running:
    """Start both apps on their listeners; returns the bound ports (useful with port 0)."""
    runners = []
    ports = []
    for app, (host, port) in ((apps.proxy, settings.listen),
                              (apps.metrics, settings.metrics_listen)):
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=2048)
        await site.start()
        runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        ports.append(sockets[0].getsockname()[1] if sockets else port)
    return Running(runners, ports[0], ports[1])


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM; in-flight streams get the shutdown grace period."""
    apps = make_app(settings, registry=default_registry())
    running = await start(apps, settings)
    log.info("proxy on %s:%d -> %s; metrics on %s:%d", settings.listen[0], running.proxy_port,
             settings.upstream, settings.metrics_listen[0], running.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await running.stop()
