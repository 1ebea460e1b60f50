"""Shared test machinery: a scripted upstream over real loopback sockets, and a running sidecar."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    async def wait_record(self, within: float = 6.0) -> dict[str, Any]:
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

    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("redis-server did not start")
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
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(self.metrics_url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the sidecar did not become ready")

    async def stop(self, sig: int | None = None) -> int | None:
        import signal

        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM if sig is None else sig)
            await asyncio.wait_for(self.proc.wait(), 30)
        return self.proc.returncode if self.proc else None
