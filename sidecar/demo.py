"""`sidecar demo`: mock upstream + sidecar + a little traffic + the live view, all on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import random
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from .app import default_registry, make_app, start
from .config import KeyEntry, Settings
from .mock_realtime import GEMINI_LIVE_PATH
from .mock_upstream import make_mock_app
from .tokens import Tokenizers
from .top import parse, render

# Demo keys are fake; two have aliases in the demo config, one shows up as a keyed hash.
DEMO_KEYS = ("sk-demo-alice-0000000000000000", "sk-demo-bob-1111111111111111",
             "sk-demo-carol-2222222222222222")
SCENARIOS: tuple[dict[str, Any], ...] = (
    {"model": "gpt-4o-mini", "stream": True, "usage": True, "fragment": 0},
    {"model": "gpt-4.1", "stream": True, "usage": False, "fragment": 3},
    {"model": "gpt-3.5-turbo", "stream": True, "usage": True, "fragment": 0},
    {"model": "gpt-4o-mini", "stream": False, "usage": True, "fragment": 0},
    {"model": "gpt-4.1", "stream": True, "usage": True, "fragment": 3},
)
PROMPTS = ("Explain token accounting in two sentences.", "用两句话解释流式计费。",
           "Write a tiny fib function.", "Give me a four-step rollout plan.")


def demo_settings(upstream: str, listen: tuple[str, int], metrics_listen: tuple[str, int],
                  records: str) -> Settings:
    keys = (KeyEntry(hashlib.sha256(DEMO_KEYS[0].encode()).hexdigest(), "alice", "research"),
            KeyEntry(hashlib.sha256(DEMO_KEYS[1].encode()).hexdigest(), "bob", "product"))
    # The demo keeps nothing on disk: its learned factors would only describe the mock.
    return Settings(upstream=upstream, listen=listen, metrics_listen=metrics_listen,
                    keys=keys, records=records, team_header="X-Team", state="memory://")


async def _traffic(proxy_url: str, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            sc = rng.choice(SCENARIOS)
            body: dict[str, Any] = {
                "model": sc["model"], "stream": sc["stream"],
                "messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": rng.choice(PROMPTS)}]}
            if sc["stream"] and sc["usage"]:
                body["stream_options"] = {"include_usage": True}
            key = rng.choice(DEMO_KEYS)
            headers = {"Authorization": f"Bearer {key}", "X-Mock-Fragment": str(sc["fragment"])}
            if key == DEMO_KEYS[2]:
                headers["X-Team"] = "ops"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(f"{proxy_url}/v1/chat/completions", json=body,
                                        headers=headers) as resp:
                    # Streams in flight finish even after stop: the final totals settle all.
                    async for _ in resp.content.iter_any():
                        pass
            await asyncio.sleep(rng.uniform(0.05, 0.4))


async def _voice(proxy_url: str, stop: asyncio.Event, seed: int) -> None:
    """Realtime sessions over WebSocket: audio in, a spoken answer out, alternately OpenAI's
    Realtime protocol and Gemini Live (the mock upstream serves both)."""
    rng = random.Random(seed)
    ws_url = proxy_url.replace("http", "ws", 1)
    async with aiohttp.ClientSession() as session:
        for turn in itertools.count():
            if stop.is_set():
                return
            audio = base64.b64encode(bytes(rng.randrange(24_000, 96_000))).decode()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                if turn % 2 == 0:
                    async with session.ws_connect(
                            f"{ws_url}/v1/realtime?model=gpt-realtime",
                            headers={"Authorization": f"Bearer {DEMO_KEYS[1]}"}) as ws:
                        await ws.send_json({"type": "input_audio_buffer.append",
                                            "audio": audio})
                        await ws.send_json({"type": "response.create"})
                        async for msg in ws:
                            if isinstance(msg.data, str) and '"response.done"' in msg.data:
                                break
                else:
                    async with session.ws_connect(
                            f"{ws_url}{GEMINI_LIVE_PATH}?key={DEMO_KEYS[0]}") as ws:
                        await ws.send_json({"setup": {
                            "model": "models/gemini-live-2.5-flash-preview"}})
                        await ws.receive()
                        await ws.send_json({"realtimeInput": {"audio": {
                            "data": audio, "mimeType": "audio/pcm;rate=16000"}}})
                        await ws.send_json({"realtimeInput": {"text": "Any news?"}})
                        async for msg in ws:
                            if isinstance(msg.data, bytes) and b"usageMetadata" in msg.data:
                                break
            await asyncio.sleep(rng.uniform(1.0, 3.0))


async def run_demo(duration: float = 20.0, workers: int = 4, pace: float = 0.04,
                   listen: tuple[str, int] = ("127.0.0.1", 0),
                   metrics_listen: tuple[str, int] = ("127.0.0.1", 0),
                   records: str = "off") -> str:
    """Run the demo; returns the final table (also printed)."""
    tokenizers = Tokenizers()
    mock_runner = web.AppRunner(make_mock_app(pace=pace, tokenizers=tokenizers), access_log=None)
    await mock_runner.setup()
    mock_site = web.TCPSite(mock_runner, "127.0.0.1", 0)
    await mock_site.start()
    mock_port = mock_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = demo_settings(f"http://127.0.0.1:{mock_port}", listen, metrics_listen, records)
    apps = make_app(settings, registry=default_registry(), tokenizers=tokenizers)
    running = await start(apps, settings, shutdown_timeout=2.0)
    proxy_url = f"http://127.0.0.1:{running.proxy_port}"
    metrics_url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    out = sys.stdout
    tty = out.isatty()
    print(f"mock upstream  http://127.0.0.1:{mock_port}\nsidecar proxy  {proxy_url}\n"
          f"metrics        {metrics_url}\n(try: sidecar top --metrics {metrics_url})\n",
          flush=True)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_traffic(proxy_url, stop, seed), name=f"demo-traffic-{seed}")
             for seed in range(workers)]
    tasks.append(asyncio.create_task(_voice(proxy_url, stop, workers), name="demo-voice"))
    prev = None
    table = ""
    deadline = time.monotonic() + duration if duration > 0 else None
    try:
        async with aiohttp.ClientSession() as session:
            for tick in itertools.count():
                await asyncio.sleep(1.0)
                async with session.get(metrics_url) as resp:
                    cur = parse(await resp.text(), time.monotonic())
                table = render(prev, cur)
                prev = cur
                if tty:
                    out.write("\x1b[H\x1b[2J")
                    print(f"token sidecar demo - {proxy_url} - live\n{table}", flush=True)
                elif tick % 5 == 4:
                    print(f"[{tick + 1}s]\n{table}\n", flush=True)
                if deadline is not None and time.monotonic() >= deadline:
                    break
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        # One last scrape after every request has settled.
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
            table = render(prev, parse(await resp.text(), time.monotonic()))
        await running.stop()
        await mock_runner.cleanup()
    print(f"final totals (all requests settled):\n{table}", flush=True)
    return table
