"""Side-by-side benchmark: direct, a bare aiohttp pass-through, the sidecar (and LiteLLM's proxy
when installed), measured in the same run over loopback. Run by hand, never in CI:

    .venv/bin/python bench/bench.py                    # every scenario, ~4 minutes
    .venv/bin/python bench/bench.py --only throughput  # one scenario
    .venv/bin/python bench/bench.py --soak-seconds 600 --markdown bench-results.md

The fake upstream and the load generator share this process; each proxy runs in its own process,
so its CPU time (from /proc) is its own. Results depend on the machine: compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
WORDS = [" token", " stream", " meter", " sidecar", " budget", " count", " live", " frame"]

# ---------------------------------------------------------------------------------------------
# The fake upstream: OpenAI-style SSE, shaped by request headers, events pre-built and cached.


@dataclass(frozen=True)
class Shape:
    chunks: int = 200
    pace_ms: float = 0.0
    tokens: int = 1  # tokens of text per event
    per_write: int = 1  # events per socket write
    split: str = "none"  # none | line (mid-line) | char (mid UTF-8 character)
    tool_bytes: int = 0  # >0: tool-call argument deltas of this size instead of text
    tool_blob: bool = False  # tool arguments as one run with no spaces (base64-like)
    usage: bool = True

    def headers(self) -> dict[str, str]:
        return {"X-Bench": orjson.dumps(self.__dict__).decode()}


_CACHE: dict[Shape, list[bytes]] = {}


def writes_for(shape: Shape) -> list[bytes]:
    if shape in _CACHE:
        return _CACHE[shape]
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini"}
    events = []
    for i in range(shape.chunks):
        if shape.tool_bytes:
            if shape.tool_blob:
                args = "QUJD" * (shape.tool_bytes // 4)
            else:  # JSON a model writes: keys, paths, numbers, prose
                unit = ('{"path": "src/app/handlers/orders.py", "line": 1842, "replace": '
                        '"return await session.execute(query, timeout=30)"}, ')
                args = (unit * (shape.tool_bytes // len(unit) + 1))[:shape.tool_bytes]
            delta: dict[str, Any] = {"tool_calls": [{"index": 0, "function": {
                "arguments": args}}]}
        elif shape.split == "char":
            delta = {"content": "你好世界" * shape.tokens}
        else:
            delta = {"content": "".join(WORDS[(i + j) % len(WORDS)] for j in range(shape.tokens))}
        events.append(b"data: " + orjson.dumps({**base, "choices": [
            {"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n")
    if shape.usage:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": {
            "prompt_tokens": 10, "completion_tokens": shape.chunks * shape.tokens,
            "total_tokens": 10 + shape.chunks * shape.tokens}}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    writes = [b"".join(events[i:i + shape.per_write])
              for i in range(0, len(events), shape.per_write)]
    if shape.split in ("line", "char"):
        out = []
        for w in writes:  # cut every write in two: mid-line, or inside a 3-byte character
            cut = len(w) // 2
            if shape.split == "char" and "好".encode() in w:
                cut = w.index("好".encode()) + 1
            out += [w[:cut], w[cut:]]
        writes = out
    _CACHE[shape] = writes
    return writes


# Hop timings: when each X-Bench-Hop request reached the upstream, and when the upstream wrote
# its first chunk (same process, same clock as the load generator).
HOP_ARRIVED: dict[str, float] = {}
HOP_FIRST: dict[str, float] = {}
HOP_CHUNK = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
             b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" hop"},'
             b'"finish_reason":null}]}\n\n')


def upstream_app() -> web.Application:
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        hop = request.headers.get("X-Bench-Hop")
        if hop:
            HOP_ARRIVED[hop] = time.perf_counter()
        await request.read()
        if hop:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(0.005)
            HOP_FIRST[hop] = time.perf_counter()
            await resp.write(HOP_CHUNK)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        shape = Shape(**orjson.loads(request.headers.get("X-Bench", "{}")))
        if request.headers.get("X-Bench-Nonstream"):
            return web.json_response({
                "id": "x", "object": "chat.completion", "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": {"content": "hello"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pace = shape.pace_ms / 1000
        try:
            for w in writes_for(shape):
                if pace:
                    await asyncio.sleep(pace)
                await resp.write(w)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def realtime(request: web.Request) -> web.WebSocketResponse:
        """A Realtime-shaped WebSocket upstream: 'go N' streams N response events (an audio
        delta of ~85 ms of PCM16 and a transcript delta per step, then response.done);
        anything else is echoed at once (the latency probe)."""
        ws = web.WebSocketResponse(max_msg_size=16 * 2**20)
        await ws.prepare(request)
        if request.path.endswith("/realtime"):
            await ws.send_str(REALTIME_CREATED)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            if msg.data.startswith("go "):
                n = int(msg.data[3:])
                await ws.send_str(REALTIME_RESPONSE_CREATED)
                for i in range(n):
                    await ws.send_str(REALTIME_AUDIO if i % 2 else REALTIME_TEXT)
                await ws.send_str(REALTIME_DONE)
            else:
                await ws.send_str(msg.data)
        return ws

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_get("/v1/echo", realtime)  # a generic WebSocket: relayed, not metered
    return app


REALTIME_CREATED = orjson.dumps({"type": "session.created", "event_id": "e0", "session": {
    "model": "gpt-realtime", "audio": {"output": {"format": {"type": "audio/pcm",
                                                            "rate": 24000}}}}}).decode()
REALTIME_RESPONSE_CREATED = orjson.dumps({"type": "response.created", "event_id": "e1",
                                          "response": {"id": "resp_1"}}).decode()
REALTIME_AUDIO = orjson.dumps({
    "type": "response.output_audio.delta", "event_id": "e2", "response_id": "resp_1",
    "item_id": "item_1", "output_index": 0, "content_index": 0,
    "delta": __import__("base64").b64encode(bytes(4096)).decode()}).decode()
REALTIME_TEXT = orjson.dumps({
    "type": "response.output_audio_transcript.delta", "event_id": "e3",
    "response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0,
    "delta": " word"}).decode()
REALTIME_DONE = orjson.dumps({"type": "response.done", "event_id": "e4", "response": {
    "id": "resp_1", "status": "completed", "usage": {
        "total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
        "input_token_details": {"text_tokens": 50, "audio_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 10, "audio_tokens": 40}}}}).decode()


# ---------------------------------------------------------------------------------------------
# Targets: direct, bare pass-through, sidecar, LiteLLM (optional), each its own process.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    metrics: str | None = None  # the sidecar's /metrics, for its fast-lane counters

    async def scrape(self) -> str:
        """The sidecar's /metrics exposition ("" for targets without the metrics)."""
        if self.metrics is None:
            return ""
        async with aiohttp.ClientSession() as s, s.get(self.metrics) as r:
            return await r.text()

    async def meter_counts(self) -> tuple[float, float, float]:
        """(fast-lane bytes, general-path bytes, text characters estimated by length) so far;
        zeros for targets without the metrics (or a baseline commit that predates them)."""
        got = {"fast": 0.0, "general": 0.0, "chars": 0.0}
        for line in (await self.scrape()).splitlines():
            if line.startswith('llm_meter_bytes_total{path="fast"}'):
                got["fast"] = float(line.split()[-1])
            elif line.startswith('llm_meter_bytes_total{path="general"}'):
                got["general"] = float(line.split()[-1])
            elif line.startswith("llm_tokenizer_estimated_chars_total "):
                got["chars"] = float(line.split()[-1])
        return got["fast"], got["general"], got["chars"]

    async def settled_counts(self) -> tuple[float, float]:
        """(requests settled, of them estimated: their output estimate was compared with the
        reported count) so far; zeros for targets without the metrics."""
        requests = estimated = 0.0
        for line in (await self.scrape()).splitlines():
            if line.startswith("llm_requests_total{"):
                requests += float(line.split()[-1])
            elif line.startswith("llm_token_estimate_ratio_count{") and \
                    'token_type="output"' in line:
                estimated += float(line.split()[-1])
        return requests, estimated

    def cpu_seconds(self) -> float:
        """CPU time of every thread of the process and its children (workers), from the
        scheduler's nanosecond counters (the 10 ms ticks of /proc/PID/stat are too coarse to
        compare runs a few percent apart)."""
        if self.proc is None:
            return 0.0
        total = 0
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                     .read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError), \
                            open(f"/proc/{pid}/task/{task}/schedstat") as f:
                        total += int(f.read().split()[0])
        return total / 1e9

    def rss(self) -> int:
        if self.proc is None:
            return 0
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd")) if self.proc else 0


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# A request the fake upstream answers with a whole (non-streamed) answer.
NONSTREAM_HEADERS = {"X-Bench-Nonstream": "1", "Content-Type": "application/json"}


# --budget: every request matches a USD budget, so live spend is computed per event.
BUDGET_CONFIG = """budgets:
  - {name: bench, match: {model: "*"}, window: day, limit_usd: 1000000000, action: block}
"""


# --pin: proxies on CPU 0, the load generator (this process) on CPU 1.
PROXY_CPUS: list[str] = []


def start_sidecar(name: str, upstream: str, tree: Path, config: Path | None,
                  workers: int = 1, entry: list[str] | None = None) -> Target:
    """A sidecar from a source tree (this checkout, or a baseline worktree), its own process
    (a supervisor and its workers with ``workers`` > 1); ``entry`` replaces ``-m sidecar``
    (bench/app_floor.py: the same process and app without accounting)."""
    port, mport = free_port(), free_port()
    env = {**os.environ, "SIDECAR_RECORDS": "off", "SIDECAR_STATE": "memory://",
           "SIDECAR_LOG_LEVEL": "warning", "SIDECAR_MAX_CONCURRENT_REQUESTS": "100000",
           "PYTHONPATH": str(tree)}
    if workers > 1:
        env["SIDECAR_WORKERS"] = str(workers)
        env["SIDECAR_STATE"] = f"sqlite:////tmp/sidecar-bench-{os.getpid()}-{port}.db"
    cmd = [*PROXY_CPUS, sys.executable, *(entry or ["-m", "sidecar"]), "run",
           "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
           "--metrics-listen", f"127.0.0.1:{mport}"]
    if config is not None:
        cmd += ["--config", str(config)]
    return Target(name, f"http://127.0.0.1:{port}", subprocess.Popen(cmd, env=env, cwd=tree),
                  f"http://127.0.0.1:{mport}/metrics")


def baseline_tree(ref: str) -> Path:
    """A detached worktree of ``ref`` (removed again by remove_baseline)."""
    path = Path(f"/tmp/sidecar-bench-baseline-{os.getpid()}")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), ref],
                   check=True, capture_output=True)
    return path


def remove_baseline(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                   check=False, capture_output=True)


def start_targets(upstream: str, with_litellm: bool, baseline: Path | None = None,
                  baseline_name: str = "", config: Path | None = None) -> list[Target]:
    targets = [Target("direct", upstream)]
    port = free_port()
    bare = subprocess.Popen([*PROXY_CPUS, sys.executable, str(ROOT / "bench" / "passthrough.py"),
                             "--upstream", upstream, "--port", str(port)])
    targets.append(Target("bare aiohttp", f"http://127.0.0.1:{port}", bare))
    if baseline is not None:
        targets.append(start_sidecar(f"sidecar@{baseline_name}", upstream, baseline, config))
    targets.append(start_sidecar("sidecar", upstream, ROOT, config))
    if with_litellm:
        port = free_port()
        lite = subprocess.Popen(["litellm", "--port", str(port), "--num_workers", "1",
                                 "--model", "openai/gpt-4o-mini", "--api_base", upstream + "/v1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets.append(Target("litellm", f"http://127.0.0.1:{port}", lite))
    for t in targets[1:]:
        wait_port(int(t.url.rsplit(":", 1)[1]), timeout=120)
    time.sleep(1.0)  # the sidecar loads its encodings in the background once listening
    return targets


# ---------------------------------------------------------------------------------------------
# The load generator.


@dataclass
class StreamResult:
    ok: bool
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    events: int = 0


async def one_stream(session: aiohttp.ClientSession, url: str, shape: Shape) -> StreamResult:
    t0 = time.perf_counter()
    res = StreamResult(ok=False)
    body = (b'{"model": "gpt-4o-mini", "stream": true, '
            b'"messages": [{"role": "user", "content": "hi"}]}')
    try:
        async with session.post(url + "/v1/chat/completions", data=body,
                                headers={**shape.headers(), "Authorization": "Bearer sk-bench",
                                         "Content-Type": "application/json"}) as r:
            last = None
            tail = b""
            async for data in r.content.iter_any():
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.gaps.append(now - last)
                last = now
                joined = tail + data
                res.events += joined.count(b"\n\n")
                tail = joined[-1:]
            res.ok = r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        res.ok = False
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        yield s


# ---------------------------------------------------------------------------------------------
# Scenarios. Each returns (title, header, rows).

Table = tuple[str, list[str], list[list[str]]]


async def scenario_ttft(targets: list[Target], rounds: int = 40) -> Table:
    """One stream at a time, the targets taking turns each round, so that the machine's drift
    over the run falls on every target alike."""
    shape = Shape(chunks=64, pace_ms=20, tokens=3)
    ttfts: dict[str, list[float]] = {t.name: [] for t in targets}
    gaps: dict[str, list[float]] = {t.name: [] for t in targets}
    async with client() as s:
        for t in targets:  # warm up: connections, caches
            await one_stream(s, t.url, Shape(chunks=4, pace_ms=1, tokens=3))
        for _ in range(rounds):
            for t in targets:
                r = await one_stream(s, t.url, shape)
                ttfts[t.name].append(r.ttft)
                gaps[t.name] += r.gaps
    rows = []
    base: dict[str, float] = {}
    for t in targets:
        m = {"ttft50": pct(ttfts[t.name], .5), "ttft99": pct(ttfts[t.name], .99),
             "gap50": pct(gaps[t.name], .5), "gap99": pct(gaps[t.name], .99)}
        if t.name == "direct":
            base = m
        rows.append([t.name] + [f"{m[k] * 1000:.2f}" for k in m] +
                    [f"{(m['ttft50'] - base['ttft50']) * 1000:+.2f}",
                     f"{(m['gap99'] - base['gap99']) * 1000:+.2f}"])
    return (f"1. One paced stream at a time (64 chunks at 20 ms, {rounds} rounds, targets "
            "interleaved), ms",
            ["target", "TTFT p50", "TTFT p99", "gap p50", "gap p99", "added TTFT p50",
             "added gap p99"], rows)


async def scenario_hop(targets: list[Target], rounds: int = 200) -> Table:
    """What a hop adds to time to first token, in its two parts: the request reaching the
    upstream, and the upstream's first chunk reaching the client. Timed in this process (one
    clock), targets interleaved, many rounds: the figure is not lost in a pace timer's jitter."""
    body = (b'{"model": "gpt-4o-mini", "stream": true, '
            b'"messages": [{"role": "user", "content": "hi"}]}')
    req: dict[str, list[float]] = {t.name: [] for t in targets}
    first: dict[str, list[float]] = {t.name: [] for t in targets}
    async with client() as s:
        for i in range(rounds + 5):
            for t in targets:
                hop = f"{t.name}-{i}"
                t0 = time.perf_counter()
                async with s.post(t.url + "/v1/chat/completions", data=body, headers={
                        "X-Bench-Hop": hop, "Content-Type": "application/json"}) as r:
                    async for _ in r.content.iter_any():
                        t1 = time.perf_counter()
                        break
                    await r.read()
                if i >= 5:  # warm-up rounds
                    req[t.name].append(HOP_ARRIVED.pop(hop) - t0)
                    first[t.name].append(t1 - HOP_FIRST.pop(hop))
                await asyncio.sleep(0.002)
    rows = []
    direct = req["direct"], first["direct"]
    for t in targets:
        a, b = statistics.median(req[t.name]), statistics.median(first[t.name])
        added = a + b - statistics.median(direct[0]) - statistics.median(direct[1])
        rows.append([t.name, f"{a * 1000:.3f}", f"{b * 1000:.3f}", f"{added * 1000:+.3f}"])
    return (f"1b. What a hop adds to TTFT ({rounds} rounds, targets interleaved, p50), ms",
            ["target", "request -> upstream", "first chunk -> client",
             "added to TTFT vs direct"], rows)


async def scenario_paced(targets: list[Target], levels: list[int]) -> Table:
    shape = Shape(chunks=40, pace_ms=50, tokens=3)  # 20 chunks/s for 2 s
    rows = []
    for t in targets:  # direct is the control: where it stalls, the load generator is the limit
        best = 0
        for n in levels:
            cpu0, w0 = t.cpu_seconds(), time.perf_counter()
            async with client() as s:
                results = await asyncio.gather(*(one_stream(s, t.url, shape) for _ in range(n)))
            cpu = (t.cpu_seconds() - cpu0) / (time.perf_counter() - w0)
            stalls = sum(1 for r in results for g in r.gaps if g > 2 * shape.pace_ms / 1000)
            errors = sum(1 for r in results if not r.ok)
            max_gap = max((g for r in results for g in r.gaps), default=0)
            rows.append([t.name, str(n), str(errors), str(stalls), f"{max_gap * 1000:.0f}",
                         "-" if t.proc is None else f"{cpu * 100:.0f}%"])
            if errors or stalls:
                break
            best = n
        rows.append([t.name, f"largest N without stalls: {best}", "", "", "", ""])
    return ("2. Paced concurrent streams (20 chunks/s each; stall = gap > 100 ms)",
            ["target", "N", "errors", "stalls", "max gap ms", "proxy CPU (1 core = 100%)"],
            rows)


@dataclass
class Run:
    rate: float  # events/s, median
    cpu: float  # proxy CPU ms per 1000 events, median
    lane: float | None  # share of metered bytes the fast lane read (None: not reported)
    by_length: float  # characters of text estimated by length per event (budget spent)

    def lane_text(self) -> str:
        return "-" if self.lane is None else f"{self.lane * 100:.0f}%"


async def _throughput(t: Target, shape: Shape, streams: int = 20, repeat: int = 3) -> Run:
    """Median events/s and proxy CPU ms per 1000 events over ``repeat`` runs."""
    rates, cpus = [], []
    f0, g0, c0 = await t.meter_counts()
    total = 0
    for _ in range(repeat):
        cpu0, w0 = t.cpu_seconds(), time.perf_counter()
        async with client() as s:
            results = await asyncio.gather(*(one_stream(s, t.url, shape)
                                             for _ in range(streams)))
        wall = time.perf_counter() - w0
        events = sum(r.events for r in results)
        total += events
        assert all(r.ok for r in results), f"{t.name}: failed streams"
        rates.append(events / wall)
        cpus.append((t.cpu_seconds() - cpu0) * 1000 / events * 1000)
    f1, g1, c1 = await t.meter_counts()
    read = (f1 - f0) + (g1 - g0)
    return Run(statistics.median(rates), statistics.median(cpus),
               (f1 - f0) / read if read else None, (c1 - c0) / total if total else 0.0)


async def scenario_throughput(targets: list[Target]) -> Table:
    rows = []
    for tokens in (1, 5, 20):
        shape = Shape(chunks=1000, tokens=tokens)
        rates: dict[str, float] = {}
        for t in targets:
            await _throughput(t, shape, 4, 1)  # warm up connections and caches
            run = await _throughput(t, shape)
            rates[t.name] = run.rate
            bare = rates.get("bare aiohttp")
            rows.append([str(tokens), t.name, f"{run.rate:,.0f}",
                         "-" if t.proc is None else f"{run.cpu:.2f}",
                         "-" if not bare or t.name in ("direct", "bare aiohttp")
                         else f"{run.rate / bare:.2f}x", run.lane_text(),
                         "-" if t.metrics is None else f"{run.by_length:,.0f}"])
    return ("3. Unpaced throughput (20 concurrent streams x 1000 events, median of 3)",
            ["tokens/event", "target", "events/s", "proxy CPU ms / 1000 events",
             "vs bare", "fast lane", "chars/event estimated by length"], rows)


def scenario_layers() -> Table:
    """CPU per 1000 events of each accounting layer, on the sans-IO code alone."""
    from prometheus_client import CollectorRegistry, Counter

    from sidecar.dialects import fastlane, get_dialect
    from sidecar.dialects.base import RequestInfo
    from sidecar.frames import SSEDecoder
    from sidecar.meter import Meter
    from sidecar.tokens import Tokenizers

    tokenizers = Tokenizers()
    tok = tokenizers.for_model("gpt-4o-mini")
    dialect = get_dialect("openai")

    class Null:
        def text(self, *a: Any) -> None: ...
        def usage(self, *a: Any) -> None: ...
        def model(self, *a: Any) -> None: ...
        def finish_reason(self, *a: Any) -> None: ...
        def error(self, *a: Any) -> None: ...
        def malformed(self, *a: Any) -> None: ...

    counter = Counter("x", "x", ["a"], registry=CollectorRegistry()).labels("a")
    rows = []
    for tokens, per_write in ((1, 1), (5, 1), (20, 1), (3, 8)):
        shape = Shape(chunks=2000, tokens=tokens, per_write=per_write)
        writes = writes_for(shape)
        events = 2000
        # What an exact count cannot go below: tiktoken on each read's text, nothing else.
        texts = ["".join(WORDS[(i + j) % len(WORDS)] for i in range(k, min(k + per_write, 2000))
                         for j in range(tokens)) for k in range(0, 2000, per_write)]
        label = f"{tokens}" if per_write == 1 else f"{tokens}, {per_write} per read"

        def framing(writes: list[bytes] = writes) -> None:
            dec = SSEDecoder()
            for w in writes:
                dec.feed(w)

        def with_dialect(writes: list[bytes] = writes) -> None:
            dec, parser = SSEDecoder(), dialect.stream_parser(Null())
            for w in writes:
                for f in dec.feed(w):
                    parser.on_frame(f)  # type: ignore[arg-type]

        def tiktoken_alone(texts: list[str] = texts) -> None:
            encode = tok.enc.encode_ordinary
            for text in texts:
                encode(text)

        def tokenizing(metrics: bool = False, writes: list[bytes] = writes) -> None:
            m = Meter(dialect, RequestInfo(model="gpt-4o-mini", stream=True), tok,
                      time.monotonic)
            m.start_response("text/event-stream", None)
            for w in writes:
                m.feed(w)
                n = m.take_live()
                if metrics and n:
                    counter.inc(n)
            m.end_of_body()

        def python_lane() -> None:
            was = fastlane.use_native(False)
            try:
                tokenizing(True)
            finally:
                fastlane.use_native(was)

        layers: list[tuple[str, Callable[[], None]]] = [
            ("framing only", framing), ("framing + dialect", with_dialect),
            ("meter: framing + dialect + tokenizing", tokenizing),
            ("meter + live counter (full path)", lambda: tokenizing(True))]
        if fastlane.NATIVE:
            layers.append(("full path, the lane in Python (no C compiler at install)",
                           python_lane))
        layers.append(("tiktoken alone on each read's text (the exact count's floor)",
                       tiktoken_alone))
        for name, fn in layers:
            fn()
            runs = []
            for _ in range(5):
                t0 = time.process_time()
                fn()
                runs.append(time.process_time() - t0)
            ms = min(runs) / events * 1000 * 1000
            rows.append([label, name, f"{ms:.2f}", f"{1000 / ms * 1000:,.0f}"])
    return ("3b. Accounting cost per layer (sans-IO, one core)",
            ["tokens/event", "layers", "CPU ms / 1000 events", "events/s"], rows)


async def scenario_odd(targets: list[Target], upstream: str) -> Table:
    """Framings that are not one event per read; with the sidecar's app without accounting
    (bench/app_floor.py) as the floor the accounting adds to."""
    async with app_floor(upstream) as floor:
        return await _odd([*targets, floor])


async def _odd(targets: list[Target]) -> Table:
    rows = []
    for label, shape in (("8 events per write", Shape(chunks=1000, per_write=8, tokens=3)),
                         ("split mid-line", Shape(chunks=1000, split="line", tokens=3)),
                         ("split mid-character", Shape(chunks=1000, split="char", tokens=2)),
                         ("4 KB tool-call deltas (JSON)", Shape(tool_bytes=4096, chunks=200)),
                         ("4 KB tool-call deltas, no spaces (base64)",
                          Shape(tool_bytes=4096, chunks=200, tool_blob=True))):
        rates: dict[str, float] = {}
        for t in targets:
            await _throughput(t, shape, 4, 1)
            run = await _throughput(t, shape)
            rates[t.name] = run.rate
            ratio = run.rate / rates.get("bare aiohttp", run.rate)
            rows.append([label, t.name, f"{run.rate:,.0f}",
                         "-" if t.proc is None else f"{run.cpu:.2f}",
                         "-" if t.name in ("direct", "bare aiohttp") else f"{ratio:.2f}x",
                         run.lane_text(),
                         "-" if t.metrics is None else f"{run.by_length:,.0f}"])
    return ("4. Odd framing (20 concurrent streams)",
            ["case", "target", "events/s", "proxy CPU ms / 1000 events", "vs bare",
             "fast lane", "chars/event estimated by length"], rows)


async def scenario_workers(targets: list[Target], upstream: str) -> Table:
    """Throughput with one and two processes: the bare pass-through forked on one port, the
    sidecar with --workers 2 (budgets and metrics shared through SQLite)."""
    port = free_port()
    bare2 = Target("bare aiohttp x2", f"http://127.0.0.1:{port}", subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, str(ROOT / "bench" / "passthrough.py"), "--upstream", upstream,
         "--port", str(port), "--processes", "2"], start_new_session=True))
    side2 = start_sidecar("sidecar --workers 2", upstream, ROOT, None, workers=2)
    for t in (bare2, side2):
        wait_port(int(t.url.rsplit(":", 1)[1]), timeout=120)
    await asyncio.sleep(2.0)
    by_name = {t.name: t for t in targets}
    rows = []
    try:
        for tokens in (1, 5):
            shape = Shape(chunks=1000, tokens=tokens)
            rates: dict[str, float] = {}
            for t in (by_name["bare aiohttp"], bare2, by_name["sidecar"], side2):
                await _throughput(t, shape, 4, 1)
                run = await _throughput(t, shape, streams=40)
                rates[t.name] = run.rate
                base = {"bare aiohttp x2": "bare aiohttp",
                        "sidecar --workers 2": "sidecar"}.get(t.name)
                rows.append([str(tokens), t.name, f"{run.rate:,.0f}", f"{run.cpu:.2f}",
                             f"{run.rate / rates[base]:.2f}x" if base else "-"])
    finally:
        for t in (bare2, side2):
            assert t.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(t.proc.pid, 15) if t is bare2 else t.proc.terminate()
            t.proc.wait(30)
    return ("7. One and two processes (40 concurrent streams x 1000 events, median of 3)",
            ["tokens/event", "target", "events/s", "CPU ms / 1000 events (all processes)",
             "scaling vs one process"], rows)


def unique_prompts(count: int, size: int = 300_000) -> list[bytes]:
    """Non-streamed requests each carrying a different ``size``-byte prompt (nothing to
    remember from one to the next)."""
    words = ("the quick brown fox jumps over lazy dogs while reviewing source files and "
             "writing careful notes about each change").split()
    return [orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": " ".join(
        f"{words[(i * 7 + j) % len(words)]}{(i * 131 + j * 17) % 1000}"
        for j in range(size // 8))[:size]}]}) for i in range(count)]


async def scenario_mixed(targets: list[Target], rounds: int = 2) -> Table:
    """Paced streams beside heavy requests on the same proxy: what the heavy ones' reads and
    prompts do to everyone else's chunk gaps (work on the loop holds every stream up)."""
    paced = Shape(chunks=64, pace_ms=20, tokens=3)
    prompts = unique_prompts(150 * rounds)
    rows = []
    for label, heavy in (("4 KB tool-call deltas", Shape(tool_bytes=4096, chunks=200)),
                         ("8 events per write", Shape(chunks=1000, per_write=8, tokens=3)),
                         ("unique 300 KB prompts, not streamed", None)):
        for t in targets:
            gaps: list[float] = []
            heavy_done = 0
            for r in range(rounds):
                stop = asyncio.Event()

                async def hammer(s: aiohttp.ClientSession, t: Target = t,
                                 heavy: Shape | None = heavy, stop: asyncio.Event = stop,
                                 base: int = r * 150) -> None:
                    nonlocal heavy_done
                    while not stop.is_set():
                        if heavy is not None:
                            heavy_done += (await one_stream(s, t.url, heavy)).events
                            continue
                        async with s.post(t.url + "/v1/chat/completions",
                                          data=prompts[(base + heavy_done) % len(prompts)],
                                          headers=NONSTREAM_HEADERS) as resp:
                            await resp.read()
                        heavy_done += 1

                async with client() as s:
                    hammers = [asyncio.ensure_future(hammer(s)) for _ in range(2)]
                    results = await asyncio.gather(*(one_stream(s, t.url, paced)
                                                     for _ in range(50)))
                    stop.set()
                    await asyncio.gather(*hammers)
                gaps += [g for r in results for g in r.gaps]
            rows.append([label, t.name, f"{pct(gaps, 0.5) * 1000:.1f}",
                         f"{pct(gaps, 0.99) * 1000:.1f}", f"{max(gaps) * 1000:.1f}",
                         f"{heavy_done / rounds:,.0f}"])
    return ("2b. Paced streams beside heavy requests (50 paced streams, 20 ms gaps, 64 chunks; "
            "two heavy clients at a time; per round)",
            ["heavy requests", "target", "paced gap p50 ms", "p99 ms", "max ms",
             "heavy events (or prompts) per round"], rows)


async def scenario_memory(targets: list[Target], levels: list[int]) -> Table:
    rows = []
    shape = Shape(chunks=3, pace_ms=4000, tokens=3)  # streams that stay open ~12 s
    for t in targets:
        if t.proc is None:
            continue
        fds_start = t.fds()
        for n in levels:
            fds0, rss0 = t.fds(), t.rss()
            async with client() as s:
                tasks = [asyncio.create_task(one_stream(s, t.url, shape), name=f"open-{i}")
                         for i in range(n)]
                await asyncio.sleep(3)  # all open, first chunk delivered
                rss_open = t.rss()
                results = await asyncio.gather(*tasks)
            await asyncio.sleep(1)
            errors = sum(1 for r in results if not r.ok)
            rows.append([t.name, str(n), str(errors), f"{(rss_open - rss0) / n / 1024:.1f}",
                         f"{t.fds() - fds0:+d}"])
        # Idle upstream connections stay pooled for aiohttp's 15 s keep-alive (its cleanup runs
        # on a timer, so up to ~2x that); after that every descriptor must be gone.
        waited = 0
        while t.fds() > fds_start and waited < 90:
            await asyncio.sleep(5)
            waited += 5
        rows.append([t.name, f"idle {waited} s later", "", "",
                     f"{t.fds() - fds_start:+d} vs start"])
    return ("5. Memory per open stream (slow streams held open)",
            ["target", "open streams", "errors", "KB per stream",
             "fds after close (pooled upstream connections)"], rows)


async def scenario_soak(targets: list[Target], seconds: float) -> Table:
    rows = []
    shape = Shape(chunks=40, pace_ms=25, tokens=3)
    for t in targets:
        if t.proc is None:
            continue
        samples: list[tuple[float, int]] = []
        stop = time.monotonic() + seconds

        async def worker(s: aiohttp.ClientSession, stop: float = stop, url: str = t.url) -> None:
            while time.monotonic() < stop:
                await one_stream(s, url, shape)

        async with client() as s:
            workers = [asyncio.create_task(worker(s), name=f"soak-{i}") for i in range(50)]
            t0 = time.monotonic()
            while time.monotonic() < stop:
                await asyncio.sleep(5)
                samples.append((time.monotonic() - t0, t.rss()))
            await asyncio.gather(*workers)
        xs = [x for x, _ in samples[1:]]  # skip the first sample: warm-up
        ys = [y / 1024 for _, y in samples[1:]]
        slope = statistics.linear_regression(xs, ys).slope * 60 if len(xs) > 2 else 0.0
        rows.append([t.name, f"{seconds:.0f}", f"{ys[0] / 1024:.1f}" if ys else "-",
                     f"{ys[-1] / 1024:.1f}" if ys else "-", f"{slope:+.1f}"])
    return ("5b. Soak (50 concurrent paced streams, RSS sampled every 5 s)",
            ["target", "seconds", "RSS start MiB", "RSS end MiB", "slope KiB/min"], rows)


@contextlib.asynccontextmanager
async def app_floor(upstream: str) -> AsyncIterator[Target]:
    """The sidecar's own process and app with the accounting taken out (bench/app_floor.py):
    what the sidecar costs before it meters anything."""
    floor = await asyncio.to_thread(start_sidecar, "sidecar app, no accounting", upstream, ROOT,
                                    None, 1, [str(ROOT / "bench" / "app_floor.py")])
    await asyncio.to_thread(wait_port, int(floor.url.rsplit(":", 1)[1]), 120)
    await asyncio.sleep(1.0)
    try:
        yield floor
    finally:
        assert floor.proc is not None
        floor.proc.terminate()
        floor.proc.wait(30)


def agent_body(turn: int) -> bytes:
    """A request as coding agents send them (~21 KB): a long system prompt, 20 tools and the
    conversation so far, resent every turn, with a new last message each time."""
    system = ("You are a coding agent working in a large monorepo. Follow the style guide, run "
              "the tests, never push to main, explain each change briefly. ") * 60
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Does operation {i} on the workspace: reads files, "
        "edits them, or runs a command and returns its output.",
        "parameters": {"type": "object", "required": ["path"], "properties": {
            "path": {"type": "string", "description": "File path relative to the repo root"},
            "mode": {"type": "string", "enum": ["read", "write", "append"]},
            "limit": {"type": "integer", "description": "Max lines"}}}}} for i in range(20)]
    history = [{"role": "user", "content": "Fix the failing test in handlers/orders.py"},
               {"role": "assistant", "content": "Looking at the file now."}] * 40
    return orjson.dumps({"model": "gpt-4o-mini", "tools": tools, "messages": [
        {"role": "system", "content": system}, *history,
        {"role": "user", "content": f"Step {turn}: run the tests again and report."}]})


@contextlib.asynccontextmanager
async def lean_bare(upstream: str) -> AsyncIterator[Target]:
    """The bare pass-through with the sidecar's upstream client (passthrough.py --client
    sidecar): the floor of a proxy built on that client, beside the aiohttp one."""
    port = free_port()
    proc = await asyncio.to_thread(
        subprocess.Popen, [*PROXY_CPUS, sys.executable, str(ROOT / "bench" / "passthrough.py"),
                           "--upstream", upstream, "--port", str(port), "--client", "sidecar"])
    await asyncio.to_thread(wait_port, port, 60)
    try:
        yield Target("bare, sidecar's client", f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(30)


async def scenario_nonstream(targets: list[Target], upstream: str) -> Table:
    """Requests/s of each target, of the bare pass-through with the sidecar's upstream client
    (lean_bare), and of the sidecar's own process and app with the accounting taken out
    (bench/app_floor.py): what a request costs the sidecar before it meters. Two
    requests: a one-line chat, and what an agent sends (agent_body). Three interleaved rounds
    of 3 s per target (_nonstream): medians, and the ratio to bare per round (median and
    range). The last column is the whole-answer lane's share: requests settled without an
    estimate."""
    rows: list[list[str]] = []
    tiny = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    async with app_floor(upstream) as floor, lean_bare(upstream) as lean:
        for label, body in (("one-line chat", lambda n: tiny),
                            ("agent, 21 KB (system prompt, 20 tools, history)", agent_body)):
            await _nonstream([*targets, lean, floor], label, body, rows)
    return ("6. Non-streaming requests/s (20 concurrent; medians of 3 interleaved rounds)",
            ["request", "target", "requests/s", "proxy CPU us / request",
             "vs bare (range over rounds)",
             "settled from the report alone"], rows)


async def _nonstream(targets: list[Target], label: str, body: Callable[[int], bytes],
                     rows: list[list[str]], rounds: int = 3, seconds: float = 3.0) -> None:
    """Each target for ``seconds``, in turn, ``rounds`` times, every other round in reverse
    order (what runs just before a target moves its figure a few percent): a drift of the
    shared machine moves every target of a round alike, so the ratio to bare is taken within
    each round (median, and the range over the rounds)."""
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    cpus: dict[str, list[float]] = {t.name: [] for t in targets}
    settled = {t.name: [0.0, 0.0] for t in targets}
    for n in range(rounds):
        for t in targets if n % 2 == 0 else targets[::-1]:
            done = 0
            stop = time.monotonic() + seconds

            async def worker(s: aiohttp.ClientSession, url: str = t.url,
                             stop: float = stop) -> None:
                nonlocal done
                while time.monotonic() < stop:
                    async with s.post(url + "/v1/chat/completions", data=body(done),
                                      headers=NONSTREAM_HEADERS) as r:
                        await r.read()
                    done += 1

            settled0 = await t.settled_counts()
            cpu0 = t.cpu_seconds()
            async with client() as s:
                await asyncio.gather(*(worker(s) for _ in range(20)))
            rates[t.name].append(done / seconds)
            cpus[t.name].append((t.cpu_seconds() - cpu0) / done * 1e6 if done else 0.0)
            for i, (a, b) in enumerate(zip(settled0, await t.settled_counts(), strict=True)):
                settled[t.name][i] += b - a
    bare = rates.get("bare aiohttp")
    for t in targets:
        vs = "-"
        if bare and t.name not in ("direct", "bare aiohttp"):
            ratios = sorted(r / b for r, b in zip(rates[t.name], bare, strict=True))
            vs = f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        requests, estimated = settled[t.name]
        rows.append([label, t.name, f"{statistics.median(rates[t.name]):,.0f}",
                     "-" if t.proc is None else f"{statistics.median(cpus[t.name]):.0f}", vs,
                     f"{1 - estimated / requests:.0%}" if requests else "-"])


# ---------------------------------------------------------------------------------------------


def render(tables: list[Table], markdown: bool) -> str:
    out = []
    for title, header, rows in tables:
        out.append(f"\n### {title}\n" if markdown else f"\n{title}")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        if markdown:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
            out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


async def _ws_session(s: aiohttp.ClientSession, url: str, frames: int) -> int:
    async with s.ws_connect(url.replace("http", "ws", 1) + "/v1/realtime?model=gpt-realtime",
                            max_msg_size=16 * 2**20) as ws:
        await ws.receive()  # session.created
        await ws.send_str(f"go {frames}")
        got = 0
        while True:
            msg = await ws.receive()
            got += 1
            if msg.type is not aiohttp.WSMsgType.TEXT or msg.data.startswith(
                    '{"type":"response.done"'):
                return got


async def scenario_ws(targets: list[Target], sessions: int = 20, frames: int = 2000,
                      rounds: int = 1000) -> Table:
    """Realtime sessions: frames/s of 20 concurrent sessions (half audio deltas of 4 KiB PCM16,
    half transcript deltas), then the round trip of one small event, targets interleaved."""
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    cpu: dict[str, list[float]] = {t.name: [] for t in targets}
    async with client() as s:
        for t in targets:
            await asyncio.gather(*(_ws_session(s, t.url, 50) for _ in range(4)))  # warm up
        for _ in range(3):
            for t in targets:
                c0, w0 = t.cpu_seconds(), time.perf_counter()
                got = await asyncio.gather(*(_ws_session(s, t.url, frames)
                                             for _ in range(sessions)))
                wall = time.perf_counter() - w0
                rates[t.name].append(sum(got) / wall)
                cpu[t.name].append((t.cpu_seconds() - c0) * 1e6 / sum(got))
        await asyncio.sleep(2)  # let the sessions above close and settle
        rtt: dict[str, list[float]] = {t.name: [] for t in targets}
        conns = {}
        for t in targets:
            ws = await s.ws_connect(t.url.replace("http", "ws", 1) + "/v1/realtime")
            await ws.receive()
            conns[t.name] = ws
        probe = orjson.dumps({"type": "input_audio_buffer.append", "event_id": "p",
                              "audio": "AAAA" * 256}).decode()
        for i in range(rounds + 20):
            for t in targets:
                ws = conns[t.name]
                t0 = time.perf_counter()
                await ws.send_str(probe)
                await ws.receive()
                if i >= 20:
                    rtt[t.name].append(time.perf_counter() - t0)
        for ws in conns.values():
            await ws.close()
    rows = []
    bare = statistics.median(rates["bare aiohttp"]) if "bare aiohttp" in rates else None
    direct_rtt = statistics.median(rtt["direct"])
    for t in targets:
        r = statistics.median(rates[t.name])
        rows.append([t.name, f"{r:,.0f}", f"{min(rates[t.name]):,.0f}-{max(rates[t.name]):,.0f}",
                     "-" if t.proc is None else f"{statistics.median(cpu[t.name]):.1f}",
                     "-" if not bare or t.name in ("direct", "bare aiohttp")
                     else f"{r / bare:.2f}x",
                     f"{statistics.median(rtt[t.name]) * 1000:.3f}",
                     f"{(statistics.median(rtt[t.name]) - direct_rtt) * 1e6 / 2:+.0f}"])
    return (f"9. WebSocket Realtime sessions ({sessions} concurrent x {frames} frames, 3 runs; "
            f"round trip p50 over {rounds} interleaved probes)",
            ["target", "frames/s (median)", "spread", "proxy CPU us / frame", "vs bare",
             "round trip ms", "added per frame, us (one way)"], rows)


async def run(args: argparse.Namespace) -> list[Table]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=8192).start()
    upstream = f"http://127.0.0.1:{port}"
    litellm = importlib.util.find_spec("litellm") is not None and not args.no_litellm
    config = None
    if args.budget:
        config = Path(f"/tmp/sidecar-bench-{os.getpid()}.yaml")
        config.write_text(BUDGET_CONFIG)
    baseline = baseline_tree(args.baseline) if args.baseline else None
    targets = await asyncio.to_thread(start_targets, upstream, litellm, baseline,
                                      args.baseline or "", config)
    if not litellm:
        print("LiteLLM's proxy is not installed (pip install 'litellm[proxy]'): not compared.")
    tables: list[Table] = []
    only = set(args.only or [])
    scenarios: list[tuple[str, Callable[[], Any]]] = [
        ("ttft", lambda: scenario_ttft(targets)),
        ("hop", lambda: scenario_hop(targets)),
        ("paced", lambda: scenario_paced(targets, args.paced)),
        ("mixed", lambda: scenario_mixed([t for t in targets if t.name != "direct"])),
        ("throughput", lambda: scenario_throughput(targets)),
        ("layers", None),  # type: ignore[list-item]
        ("odd", lambda: scenario_odd(targets, upstream)),
        ("memory", lambda: scenario_memory(targets, args.memory)),
        ("soak", lambda: scenario_soak(targets, args.soak_seconds)),
        ("nonstream", lambda: scenario_nonstream(targets, upstream)),
        ("workers", lambda: scenario_workers(targets, upstream)),
        ("ws", lambda: scenario_ws([t for t in targets if t.name != "litellm"])),
    ]
    try:
        for name, fn in scenarios:
            if only and name not in only:
                continue
            print(f"running {name} ...", flush=True)
            table = scenario_layers() if name == "layers" else await fn()
            tables.append(table)
            print(render([table], markdown=False), flush=True)
    finally:
        for t in targets:
            if t.proc is not None:
                t.proc.terminate()
                t.proc.wait(30)
        await runner.cleanup()
        if baseline is not None:
            remove_baseline(baseline)
        if config is not None:
            config.unlink(missing_ok=True)
    return tables


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append", choices=["ttft", "hop", "paced", "mixed",
                                                       "throughput",
                                                       "layers", "workers", "ws",
                                                       "odd", "memory", "soak", "nonstream"])
    p.add_argument("--paced", type=int, nargs="+", default=[64, 128, 256, 500, 750, 1000])
    p.add_argument("--memory", type=int, nargs="+", default=[100, 500, 1000, 2000])
    p.add_argument("--soak-seconds", type=float, default=60.0)
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--baseline", metavar="GIT_REF",
                   help="also run the sidecar of this commit (a temporary worktree), side by side")
    p.add_argument("--pin", action="store_true",
                   help="pin the proxies to CPU 0 and the load generator to CPU 1 (taskset)")
    p.add_argument("--budget", action="store_true",
                   help="give every sidecar a USD budget matching every request")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    args = p.parse_args()
    if args.pin:
        PROXY_CPUS[:] = ["taskset", "-c", "0"]
        os.sched_setaffinity(0, {1})
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    print(f"machine: {machine()}; load generator loop: {loop_name}")
    tables = asyncio.run(run(args))
    if args.markdown:
        Path(args.markdown).write_text(f"Machine: {machine()}\n" + render(tables, True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
