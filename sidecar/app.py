"""Application wiring: make_app() builds the proxy and metrics apps; serve() runs them."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
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
from .budgets import Status
from .calibration import Calibration
from .config import ConfigError, Settings, load_settings
from .ledger import Ledger
from .metrics import BudgetCollector, Metrics
from .notifier import Notifier
from .pricing import price_book
from .proxy import Policy, Proxy, RecordSink
from .state import StateStore, open_store
from .tokens import Tokenizers, encoding_source
from .upstream import Upstream

log = logging.getLogger("sidecar")

SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
# Budget spend is checkpointed this often, so a crash loses at most about this much accounting.
CHECKPOINT_SECONDS = 1.0
# Learned estimate factors change slowly: written every this many checkpoints (and at shutdown).
CALIBRATION_EVERY = 5
WATCH_SECONDS = 2.0


def record_writer(target: str) -> tuple[RecordSink | None, Callable[[], None]]:
    """A sink writing one JSON line per request to stderr ('-') or a file; None for 'off' (no
    record is even built)."""
    if target == "off":
        return None, (lambda: None)
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


def upstream_ssl(settings: Settings) -> ssl.SSLContext | bool:
    """Upstream TLS: verified against the system CAs, plus ``ca_file`` when given."""
    if settings.insecure_skip_verify:
        log.warning("upstream TLS verification is OFF (insecure_skip_verify)")
        return False
    ctx = ssl.create_default_context()
    if settings.ca_file:
        ctx.load_verify_locations(cafile=settings.ca_file)
    return ctx


@web.middleware
class ConcurrencyLimit:
    """At most ``limit`` requests in the proxy at once; beyond it a clear 503, not a queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    async def __call__(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.active >= self.limit:
            return web.json_response(
                {"error": {"message": f"the sidecar is at its limit of {self.limit} concurrent "
                                      "requests (max_concurrent_requests)",
                           "type": "overloaded", "code": None}},
                status=503, headers={"Retry-After": "1"})
        self.active += 1
        try:
            result: web.StreamResponse = await handler(request)
            return result
        finally:
            self.active -= 1


def budgets_response(request: web.Request, settings: Settings, statuses: list[Status],
                     reloads: list[str]) -> web.Response:
    """GET /budgets (one process, or the supervisor of --workers): behind admin_token if set."""
    token = settings.admin_token
    if token is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.reveal().encode()):
            return web.json_response({"error": "admin token required"}, status=401)
    return web.json_response({"budgets": [st.as_json() for st in statuses],
                              "reloads": reloads}, dumps=lambda o: orjson.dumps(o).decode())


def policy_for(settings: Settings) -> Policy:
    return Policy(Attributor(settings.keys, settings.team_header, settings.key_hash_secret),
                  price_book(settings.prices, settings.prices_file))


@dataclass(slots=True)
class Apps:
    proxy: web.Application
    metrics: web.Application
    registry: CollectorRegistry
    handler: Proxy
    ledger: Ledger
    settings: Settings
    reloads: list[str] = field(default_factory=list)

    def apply(self, new: Settings) -> None:
        """Hot reload: prices, attribution and budgets. Streams in flight keep their charge."""
        self.handler.policy = policy_for(new)
        self.ledger.set_budgets(new.budgets)
        self.settings.prices, self.settings.budgets = new.prices, new.budgets
        self.settings.prices_file = new.prices_file
        self.handler.metrics.price_data(self.handler.policy.prices)
        self.handler.zero_counters()
        self.reloads.append(time.strftime("%Y-%m-%dT%H:%M:%S"))
        log.info("config reloaded: %d budgets, %d price overrides, %d key aliases",
                 len(new.budgets), len(new.prices), len(new.keys))

    def reload_from(self, file: str | None, flags: Mapping[str, Any] | None = None) -> bool:
        """Reload from the config file; an invalid file is refused and the old config kept."""
        try:
            new = load_settings(file, flags=flags)
        except ConfigError as exc:
            log.error("config reload refused, keeping the running config:\n%s", exc)
            return False
        self.apply(new)
        return True


def make_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    tokenizers: Tokenizers | None = None,
    record_sink: RecordSink | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    store_factory: Callable[[str], StateStore] | None = None,
    worker: Worker | None = None,
) -> Apps:
    """Build both apps. Nothing is opened until the apps start (see cleanup_ctx)."""
    registry = registry if registry is not None else CollectorRegistry()
    tokenizers = tokenizers or Tokenizers(open_models="background")
    metrics = Metrics(registry, max_keys=settings.max_keys, max_teams=settings.max_teams,
                      max_models=settings.max_models, otel_genai=settings.otel_genai)
    ledger = Ledger(settings.budgets)
    registry.register(BudgetCollector(ledger, wall))
    close_records: Callable[[], None] = lambda: None  # noqa: E731
    sink: RecordSink | None = record_sink
    if sink is None:
        sink, close_records = record_writer(settings.records)
    proxy_app = web.Application(client_max_size=settings.max_request_body,
                                middlewares=[ConcurrencyLimit(settings.max_concurrent_requests)])
    ready = asyncio.Event()
    calibration = Calibration()
    tls = upstream_ssl(settings)
    upstream = Upstream(ssl_verify=tls, connect_timeout=settings.connect_timeout,
                        read_timeout=settings.read_timeout)
    handler = Proxy(settings, session_getter=lambda: proxy_app[SESSION_KEY], upstream=upstream,
                    metrics=metrics,
                    worker=None if worker is None else worker.index,
                    tokenizers=tokenizers, policy=policy_for(settings), ledger=ledger,
                    record_sink=sink, calibration=calibration, clock=clock, wall=wall)
    apps = Apps(proxy_app, web.Application(), registry, handler, ledger, settings)
    metrics.price_data(handler.policy.prices)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # Load tokenizers off the loop: the first load parses a few MB of vocabulary.
        await asyncio.get_running_loop().run_in_executor(None, tokenizers.preload)
        tokenizers.warm()  # here, on the loop's thread: the one that counts
        for name in ("o200k_base", "cl100k_base"):
            log.info("encoding %s loaded from %s", name, encoding_source(name))
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True,
                                         ssl=tls)
        timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout,
                                        sock_connect=settings.connect_timeout,
                                        sock_read=settings.read_timeout)
        session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
        app[SESSION_KEY] = session
        yield
        upstream.close()
        await session.close()
        close_records()

    async def state_ctx(app: web.Application) -> AsyncIterator[None]:
        store = (store_factory(settings.state) if store_factory is not None
                 else open_store(settings.state, shared=worker is not None))
        learned = await store.load_calibration()
        calibration.restore(learned)
        ledger.load(await store.load_spend(ledger.live_keys(wall())))
        log.info("state %s: %d learned estimate factors, %d budgets", settings.state,
                 len(learned), len(ledger.budgets))
        notifier: Notifier | None = None
        hook_session: aiohttp.ClientSession | None = None
        if settings.webhook_url:
            hook_session = aiohttp.ClientSession()
            notifier = Notifier(settings.webhook_url, store, hook_session,
                                timeout=settings.webhook_timeout)
        ticker = asyncio.create_task(_tick(store, notifier), name="sidecar-state-checkpoint")
        ready.set()
        if worker is not None:
            worker.mark_ready(True)
        yield
        if worker is not None:
            worker.mark_ready(False)
        ready.clear()
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await _checkpoint(store, force_calibration=True)
        if notifier is not None:
            await notifier.close()
        if hook_session is not None:
            await hook_session.close()
        await store.close()

    async def _checkpoint(store: StateStore, force_calibration: bool = False) -> None:
        now = wall()
        deltas = ledger.take_pending()
        try:
            totals = await store.apply_spend(deltas, {k: ledger.expiry(k) for k in deltas},
                                             ledger.live_keys(now))
        except Exception as exc:  # the store is down: keep counting, retry next tick
            ledger.restore_pending(deltas)
            log.warning("state checkpoint failed (%s); retrying", type(exc).__name__)
            return
        if totals is not None:
            ledger.load(totals)
        ledger.prune(now)
        if force_calibration or calibration.dirty:
            await store.save_calibration(calibration.snapshot())
            if worker is not None:  # what the other workers learned, back in
                calibration.adopt(await store.load_calibration())

    async def _tick(store: StateStore, notifier: Notifier | None) -> None:
        n = 0
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            n += 1
            await _checkpoint(store, force_calibration=False if n % CALIBRATION_EVERY else
                              calibration.dirty)
            if notifier is not None:
                await notifier.check(ledger.statuses(wall()))

    proxy_app.cleanup_ctx.append(session_ctx)
    proxy_app.cleanup_ctx.append(state_ctx)
    proxy_app.router.add_route("*", "/{tail:.*}", handler.handle)

    async def close_sessions(app: web.Application) -> None:
        await handler.ws.shutdown()  # WebSockets would otherwise hold the shutdown grace

    proxy_app.on_shutdown.append(close_sessions)

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    async def budgets_view(request: web.Request) -> web.Response:
        return budgets_response(request, settings, ledger.statuses(wall()), apps.reloads)

    apps.metrics.router.add_get("/metrics", metrics_view)
    apps.metrics.router.add_get("/healthz", healthz)
    apps.metrics.router.add_get("/readyz", readyz)
    apps.metrics.router.add_get("/budgets", budgets_view)
    return apps


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


@dataclass(frozen=True, slots=True)
class Worker:
    """This process is one of ``--workers``: it shares the proxy port (SO_REUSEPORT, or a
    listening socket inherited from the supervisor), writes its metrics to the supervisor's
    multiprocess directory and says there when it is ready."""

    index: int
    metrics_dir: str
    fd: int | None = None  # an inherited listening socket, where SO_REUSEPORT is missing

    @classmethod
    def from_env(cls) -> Worker | None:
        index = os.environ.get("SIDECAR_WORKER_INDEX")
        if index is None:
            return None
        fd = os.environ.get("SIDECAR_WORKER_FD")
        return cls(int(index), os.environ["PROMETHEUS_MULTIPROC_DIR"],
                   int(fd) if fd else None)

    def mark_ready(self, ready: bool) -> None:
        path = os.path.join(self.metrics_dir, f"ready-{self.index}-{os.getpid()}")
        if ready:
            with open(path, "w"):
                pass
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def start(apps: Apps, settings: Settings, *,
                shutdown_timeout: float | None = None, worker: Worker | None = None) -> Running:
    """Start both apps on their listeners; returns the bound ports (useful with port 0). A
    worker serves only the proxy (the supervisor serves the metrics port)."""
    runners = []
    ports = []
    grace = settings.shutdown_grace if shutdown_timeout is None else shutdown_timeout
    apps_to_start = [(apps.proxy, settings.listen)]
    if worker is None:
        apps_to_start.append((apps.metrics, settings.metrics_listen))
    for app, (host, port) in apps_to_start:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace,
                               max_line_size=settings.max_header_size,
                               max_field_size=settings.max_header_size)
        await runner.setup()
        site: web.BaseSite
        if worker is not None and worker.fd is not None:
            site = web.SockSite(runner, socket.socket(fileno=worker.fd), backlog=2048)
        else:
            site = web.TCPSite(runner, host, port, backlog=2048,
                               reuse_port=worker is not None)
        await site.start()
        runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        ports.append(sockets[0].getsockname()[1] if sockets else port)
    return Running(runners, ports[0], ports[1] if len(ports) > 1 else 0)


async def serve(settings: Settings, flags: Mapping[str, Any] | None = None) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP (or a file change with watch_config) reloads."""
    worker = Worker.from_env()
    apps = make_app(settings, registry=default_registry() if worker is None
                    else CollectorRegistry(), worker=worker)
    running = await start(apps, settings, worker=worker)
    if worker is None:
        log.info("proxy on %s:%d, metrics on %s:%d", settings.listen[0], running.proxy_port,
                 settings.metrics_listen[0], running.metrics_port)
    else:
        log.info("worker %d (pid %d) on %s:%d", worker.index, os.getpid(), settings.listen[0],
                 running.proxy_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if settings.config_file:
        loop.add_signal_handler(signal.SIGHUP, apps.reload_from, settings.config_file, flags)
    watcher = None
    if settings.watch_config and settings.config_file:
        watcher = asyncio.create_task(_watch(apps, settings.config_file, flags),
                                      name="sidecar-config-watch")
    try:
        await stop.wait()
    finally:
        log.info("shutting down: in-flight streams get the grace period")
        if watcher is not None:
            watcher.cancel()
        await running.stop()


async def _watch(apps: Apps, file: str, flags: Mapping[str, Any] | None) -> None:
    last = os.stat(file).st_mtime_ns
    while True:
        await asyncio.sleep(WATCH_SECONDS)
        try:
            mtime = os.stat(file).st_mtime_ns
        except OSError:
            continue
        if mtime != last:
            last = mtime
            apps.reload_from(file, flags)
