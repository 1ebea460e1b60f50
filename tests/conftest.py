"""Shared test machinery: a scripted upstream over real loopback sockets, and a running sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.app import Apps, Running, make_app, start
from sidecar.config import Settings
from sidecar.tokens import Tokenizers

ROOT = Path(__file__).resolve().parent.parent


def conformance_dir() -> Path | None:
    """The shared recorded-stream fixtures: SIDECAR_CONFORMANCE_DIR, else ../shared/fixtures."""
    env = os.environ.get("SIDECAR_CONFORMANCE_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "fixtures"
    return path if path.is_dir() else None


# How long a test waits for something it expects to happen before it fails: generous, since
# a CI box is often busy with other work. A test never waits a fixed time and then asserts.
WAIT_SECONDS = 30.0

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]] | Callable[[], T], *,
                     within: float = WAIT_SECONDS, every: float = 0.05,
                     what: str = "the condition") -> T:
    """Poll ``probe`` (a function, sync or async) until it returns something truthy, and return
    that; after ``within`` seconds fail with what it returned last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        got = probe()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return cast(T, got)
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not hold within {within:.0f} s; last seen: "
                                 f"{got!r}")
        await asyncio.sleep(every)


async def steady(probe: Callable[[], T], *, quiet: float = 1.0,
                 within: float = WAIT_SECONDS) -> T:
    """``probe``'s value once it has not changed for ``quiet`` seconds (a flow that
    backpressure has stopped), or its value after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last, since = probe(), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        now = probe()
        if now != last:
            last, since = now, loop.time()
        elif loop.time() - since >= quiet:
            break
    return last


def eventually_sync(probe: Callable[[], T], *, within: float = WAIT_SECONDS,
                    every: float = 0.05, what: str = "the condition") -> T:
    """``eventually`` for code that is not async."""
    import time

    deadline = time.monotonic() + within
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {within:.0f} s; last seen: "
                                 f"{got!r}")
        time.sleep(every)


def tool(name: str, package: str) -> str:
    """A Debian-packaged tool the tests run for real; missing is a failure, not a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's '{package}' package (make test does)")
    return path


def promtool() -> str:
    return tool("promtool", "prometheus")


async def serve(app: web.Application, ssl_context: ssl.SSLContext | None = None
                ) -> tuple[web.AppRunner, int]:
    """``app`` listening on a free loopback port (TLS with ``ssl_context``): its runner, for the
    caller to clean up, and the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class ImageJobs:
    """The container image checks (tests/test_image.py), started in a thread when the session's
    tests are collected: they spend most of their time in buildah, pip and apt on the core the
    rest of the suite leaves idle. Each job is a command; its result is awaited by its test."""

    JOBS: ClassVar[dict[str, list[str]]] = {
        # The Debian base made (or imported from the hash-checked cache) in an empty container
        # storage of its own: the path a machine that never built the image takes.
        "base": ["--base-only", "--fresh-storage", "--json"],
        # The whole image, built and run from the storage this machine uses (reused when it
        # holds the base).
        "image": ["--json"],
    }

    def __init__(self) -> None:
        import threading

        self.done: dict[str, Any] = {}
        self._procs: list[Any] = []
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="image-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import subprocess
        import sys

        for name, args in self.JOBS.items():
            if self._stopped:
                break
            proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "image_smoke.py"),
                                     *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            self._procs.append(proc)
            out, err = proc.communicate()
            with self._cond:
                self.done[name] = subprocess.CompletedProcess(proc.args, proc.returncode,
                                                              out, err)
                self._cond.notify_all()

    def result(self, name: str, timeout: float = 1800.0) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: name in self.done, timeout):
                raise AssertionError(f"the image job {name!r} did not end in {timeout:.0f} s")
            return self.done[name]

    def stop(self) -> None:
        import signal

        self._stopped = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)


IMAGE_JOBS = ImageJobs()


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.nodeid.startswith("tests/test_image.py::") for item in session.items):
        IMAGE_JOBS.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    IMAGE_JOBS.stop()


@dataclass
class Script:
    """What the upstream sends for one request."""

    chunks: list[bytes]
    status: int = 200
    headers: dict[str, str] = field(
        default_factory=lambda: {"Content-Type": "text/event-stream"})
    delay: float = 0.0  # seconds before each chunk
    content_length: bool = False  # send Content-Length instead of chunked
    abort_after: int | None = None  # close the connection after this many chunks
    stall_after: int | None = None  # stop sending (but keep open) after this many chunks
    head_delay: float = 0.0  # seconds before the status line and headers
    # Before the chunk of index ``gate_at``, wait until ``gate`` is set (a test holds a stream
    # open at a known point for as long as it looks, however slow the machine is).
    gate: asyncio.Event | None = None
    gate_at: int = 0


class ScriptedUpstream:
    """A real aiohttp server; each request names its script in the X-Script header."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.finished: list[str] = []
        self.written: dict[str, int] = {}  # bytes each script got written (backpressure shows)
        self.disconnected: list[str] = []  # scripts whose client (the sidecar) went away

    def add(self, script: Script) -> str:
        sid = f"s{next(self._ids)}"
        self.scripts[sid] = script
        return sid

    async def start(self) -> None:
        self.runner, port = await serve(self.app)
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"method": request.method, "path": request.raw_path,
                              "headers": dict(request.headers), "body": body})
        sid = request.headers.get("X-Script", "")
        script = self.scripts.get(sid)
        if script is None:
            return web.json_response({"error": {"message": "no script"}}, status=404)
        if script.head_delay:
            await asyncio.sleep(script.head_delay)
        resp = web.StreamResponse(status=script.status, headers=script.headers)
        if script.content_length:
            resp.content_length = sum(len(c) for c in script.chunks)
        self.written[sid] = 0
        try:
            await resp.prepare(request)
            for i, chunk in enumerate(script.chunks):
                if script.abort_after is not None and i == script.abort_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if script.stall_after is not None and i == script.stall_after:
                    await asyncio.sleep(3600)
                if script.gate is not None and i == script.gate_at:
                    await script.gate.wait()
                if script.delay:
                    await asyncio.sleep(script.delay)
                await resp.write(chunk)
                self.written[sid] += len(chunk)
            await resp.write_eof()
        except ConnectionError:
            self.disconnected.append(sid)
        finally:
            self.finished.append(sid)
        return resp


@dataclass
class Stack:
    upstream: ScriptedUpstream
    apps: Apps
    running: Running
    registry: CollectorRegistry
    records: list[dict[str, Any]]

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.running.proxy_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.running.metrics_port}"

    async def wait_record(self, within: float = WAIT_SECONDS) -> dict[str, Any]:
        """The newest request record, waiting for the request to settle if need be."""
        deadline = asyncio.get_running_loop().time() + within
        while not self.records:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("no request record was written")
            await asyncio.sleep(0.02)
        return self.records[-1]

    def value(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching the given labels (0 when absent)."""
        total = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


_TOKENIZERS = Tokenizers()


@pytest.fixture(scope="session")
def tokenizers() -> Tokenizers:
    _TOKENIZERS.preload()
    return _TOKENIZERS


async def start_stack(tokenizers: Tokenizers, **overrides: Any) -> Stack:
    upstream = ScriptedUpstream()
    await upstream.start()
    fields: dict[str, Any] = {"upstream": upstream.url, "listen": ("127.0.0.1", 0),
                              "metrics_listen": ("127.0.0.1", 0), "state": "memory://",
                              **overrides}
    settings = Settings(**fields)
    registry = CollectorRegistry()
    records: list[dict[str, Any]] = []
    apps = make_app(settings, registry=registry, tokenizers=tokenizers,
                    record_sink=records.append)
    running = await start(apps, settings, shutdown_timeout=1.0)
    return Stack(upstream, apps, running, registry, records)


async def stop_stack(stack: Stack) -> None:
    await stack.running.stop()
    await stack.upstream.stop()


StackFactory = Callable[..., Any]


@pytest.fixture
async def stack_factory(tokenizers: Tokenizers) -> AsyncIterator[StackFactory]:
    made: list[Stack] = []

    async def make(**overrides: Any) -> Stack:
        s = await start_stack(tokenizers, **overrides)
        made.append(s)
        return s

    yield make
    for s in made:
        await stop_stack(s)


@pytest.fixture
async def stack(stack_factory: StackFactory) -> Stack:
    result: Stack = await stack_factory()
    return result


def sse(*objs: Any, done: bool = True) -> bytes:
    """An SSE body from JSON-able objects (as OpenAI sends them)."""
    import orjson

    out = b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chat_chunks(text: str, size: int, model: str = "gpt-4o-mini",
                usage: dict[str, Any] | None = None) -> bytes:
    """A chat.completions stream carrying ``text`` in ``size``-character fragments."""
    base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1,
            "model": model}
    objs: list[Any] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                   "content": ""},
                                             "finish_reason": None}]}]
    for i in range(0, len(text), size):
        objs.append({**base, "choices": [{"index": 0, "delta": {"content": text[i:i + size]},
                                          "finish_reason": None}]})
    objs.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage is not None:
        objs.append({**base, "choices": [], "usage": usage})
    return sse(*objs)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Any:
    """A real redis-server on a free loopback port, for this test only."""
    import subprocess
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is missing: install Debian's 'redis-server' (make test does)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        if proc.poll() is not None:  # its exit status says it will not answer
            pytest.fail(f"redis-server exited with status {proc.returncode} on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not answer PING within {WAIT_SECONDS:.0f} s")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


class SidecarProcess:
    """`python -m sidecar run` as a child process on free loopback ports."""

    def __init__(self, upstream: str, **env: str) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.env = {**os.environ, "SIDECAR_UPSTREAM": upstream, "SIDECAR_RECORDS": "off",
                    "SIDECAR_STATE": "memory://", **env}
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, stderr: int | None = None) -> None:
        import subprocess
        import sys

        import aiohttp

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{self.port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}", env=self.env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=stderr if stderr is not None else subprocess.DEVNULL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS
        async with aiohttp.ClientSession() as s:
            while loop.time() < deadline:
                if self.proc.returncode is not None:
                    raise AssertionError(f"the sidecar exited with status {self.proc.returncode}"
                                         " before it was ready")
                try:
                    async with s.get(self.metrics_url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"the sidecar was not ready within {WAIT_SECONDS:.0f} s")

    async def stop(self, sig: int | None = None) -> int | None:
        import signal

        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM if sig is None else sig)
            await asyncio.wait_for(self.proc.wait(), 30)
        return self.proc.returncode if self.proc else None
