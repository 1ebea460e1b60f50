"""`sidecar run --workers N`: a supervisor that starts N worker processes accepting on one proxy
port, restarts any that dies, forwards SIGTERM and SIGHUP, and serves one /metrics for all.

The workers are `sidecar run` processes of their own (SIDECAR_WORKER_INDEX set). They accept on
the proxy port with SO_REUSEPORT (or on a listening socket inherited from here where the platform
lacks it), write their metrics through prometheus-client's multiprocess mode into a directory
this process owns, and share budget spend and learned estimate factors through the state store
(SQLite on this host, or Redis), each reading back every second what all wrote. This process
serves /metrics (the workers' counters and histograms summed, in-flight gauges summed, budget
gauges from the shared store), /healthz, /readyz and /budgets on the metrics port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import ConfigError, Settings, load_settings

log = logging.getLogger("sidecar.workers")

# A worker that dies is restarted after this long, doubling up to the maximum; the delay resets
# once a worker has lived for STABLE_SECONDS.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 60.0
SYNC_SECONDS = 1.0


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    delay: float = RESTART_DELAY
    restarts: int = 0


@dataclass
class Supervisor:
    settings: Settings
    argv: list[str]
    flags: Mapping[str, Any] | None = None
    metrics_dir: str = ""
    slots: list[_Slot] = field(default_factory=list)
    stopping: bool = False
    _sock: socket.socket | None = None

    # -- workers ---------------------------------------------------------------------------------

    def _env(self, index: int) -> dict[str, str]:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
               "SIDECAR_WORKER_INDEX": str(index)}
        if self._sock is not None:
            env["SIDECAR_WORKER_FD"] = str(self._sock.fileno())
        return env

    async def _spawn(self, slot: _Slot) -> None:
        host, port = self.settings.listen
        slot.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", *self.argv, "--listen", f"{host}:{port}",
            env=self._env(slot.index),
            pass_fds=(self._sock.fileno(),) if self._sock is not None else ())
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    async def _watch(self, slot: _Slot, restarts: Any) -> None:
        """Keep one worker running: restart it with backoff whenever it exits unasked."""
        from prometheus_client import multiprocess

        while not self.stopping:
            assert slot.proc is not None
            code = await slot.proc.wait()
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                slot.proc.pid, self.metrics_dir)
            self._forget_ready(slot.index)
            if self.stopping:
                return
            lived = time.monotonic() - slot.started
            if lived > STABLE_SECONDS:
                slot.delay = RESTART_DELAY
            log.warning("worker %d (pid %d) exited with status %s after %.1f s; restarting "
                        "in %.1f s", slot.index, slot.proc.pid, code, lived, slot.delay)
            restarts.inc()
            slot.restarts += 1
            await asyncio.sleep(slot.delay)
            slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX)
            if not self.stopping:
                await self._spawn(slot)

    def _forget_ready(self, index: int) -> None:
        for name in os.listdir(self.metrics_dir):
            if name.startswith(f"ready-{index}-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.metrics_dir, name))

    def ready_workers(self) -> int:
        live = {s.proc.pid for s in self.slots if s.proc is not None and s.proc.returncode is None}
        return sum(1 for name in os.listdir(self.metrics_dir) if name.startswith("ready-")
                   and int(name.rsplit("-", 1)[1]) in live)

    def signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def worker_pids(self) -> Iterator[tuple[int, int]]:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                yield slot.index, slot.proc.pid


class _WorkerStats:
    """Memory and CPU of each worker, from /proc (process_* metrics are this process's own:
    prometheus-client's multiprocess mode does not aggregate them)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rss = GaugeMetricFamily("llm_worker_resident_memory_bytes",
                                "Resident memory of each worker process", labels=["worker"])
        cpu = CounterMetricFamily("llm_worker_cpu_seconds", "CPU time of each worker process",
                                  labels=["worker"])
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        for index, pid in self._sup.worker_pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/statm") as f:
                    pages = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue
            rss.add_metric([str(index)], pages * page)
            cpu.add_metric([str(index)], (int(fields[11]) + int(fields[12])) / ticks)
        yield rss
        yield cpu


async def supervise(settings: Settings, argv: Sequence[str],
                    flags: Mapping[str, Any] | None = None) -> None:
    """Run N workers until SIGINT/SIGTERM (which they get too, and drain); SIGHUP is passed on."""
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Info,
        ProcessCollector,
        generate_latest,
    )
    from prometheus_client import multiprocess as mp

    from .app import budgets_response
    from .ledger import Ledger
    from .metrics import BudgetCollector, build_info
    from .pricing import price_book
    from .state import open_store

    metrics_dir = tempfile.mkdtemp(prefix="sidecar-workers-")
    host, port = settings.listen
    sock: socket.socket | None = None
    if not hasattr(socket, "SO_REUSEPORT"):
        sock = socket.create_server((host, port), backlog=2048)
        sock.set_inheritable(True)
        port = sock.getsockname()[1]
    elif port == 0:
        with socket.socket() as probe:  # one port for all workers
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    settings.listen = (host, port)
    sup = Supervisor(settings, list(argv), flags, metrics_dir, _sock=sock)
    sup.slots = [_Slot(i) for i in range(settings.workers)]

    registry = CollectorRegistry()
    mp.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    registry.register(_WorkerStats(sup))
    ledger = Ledger(settings.budgets)
    registry.register(BudgetCollector(ledger, time.time))
    restarts = Counter("llm_worker_restarts", "Worker processes restarted after they died",
                       registry=registry)
    live = Gauge("llm_workers", "Worker processes running", registry=registry)
    live.set_function(lambda: sum(1 for _ in sup.worker_pids()))
    build_info(registry)
    price_info = Info("llm_price_data", "The price data costs are computed from",
                      registry=registry)

    def describe_prices(s: Settings) -> None:
        book = price_book(s.prices, s.prices_file)
        d = book.data
        price_info.info({"source": d.source, "version": d.version or "",
                         "data_as_of": d.data_as_of or "", "overrides": str(len(book.overrides))})

    describe_prices(settings)
    store = open_store(settings.state, shared=True)
    reloads: list[str] = []

    def reload() -> None:
        sup.signal_workers(signal.SIGHUP)
        if settings.config_file:
            try:
                new = load_settings(settings.config_file, flags=flags)
            except ConfigError as exc:
                log.error("config reload refused, keeping the running config:\n%s", exc)
                return
            ledger.set_budgets(new.budgets)
            describe_prices(new)
            reloads.append(time.strftime("%Y-%m-%dT%H:%M:%S"))

    async def sync() -> None:
        while True:
            with contextlib.suppress(Exception):
                ledger.load(await store.load_spend(ledger.live_keys(time.time())))
                ledger.prune(time.time())
            await asyncio.sleep(SYNC_SECONDS)

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": sum(1 for _ in sup.worker_pids())})

    async def readyz(request: web.Request) -> web.Response:
        ready = sup.ready_workers()
        body = {"status": "ready" if ready == settings.workers else "starting",
                "ready_workers": ready, "workers": settings.workers}
        return web.json_response(body, status=200 if ready == settings.workers else 503)

    async def budgets_view(request: web.Request) -> web.Response:
        return budgets_response(request, settings, ledger.statuses(time.time()), reloads)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/budgets", budgets_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    mhost, mport = settings.metrics_listen
    await web.TCPSite(runner, mhost, mport).start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    for slot in sup.slots:
        await sup._spawn(slot)
    watchers = [asyncio.create_task(sup._watch(slot, restarts), name=f"sidecar-worker-{i}")
                for i, slot in enumerate(sup.slots)]
    syncer = asyncio.create_task(sync(), name="sidecar-workers-budget-sync")
    log.info("supervising %d workers on %s:%d, metrics on %s:%d", settings.workers, host, port,
             mhost, mport)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: the workers drain their streams")
        sup.stopping = True
        sup.signal_workers(signal.SIGTERM)
        procs = [s.proc for s in sup.slots if s.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)),
                                   settings.shutdown_grace + 10)
        except TimeoutError:
            sup.signal_workers(signal.SIGKILL)
        for task in (*watchers, syncer):
            task.cancel()
        await asyncio.gather(*watchers, syncer, return_exceptions=True)
        await runner.cleanup()
        await store.close()
        if sock is not None:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
