"""Durable budget state with real processes: kill -9 and restart, two replicas on one Redis."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import (
    Script,
    ScriptedUpstream,
    SidecarProcess,
    chat_chunks,
    eventually,
    eventually_sync,
)

USAGE = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}  # 10 tokens a request


class Sidecar(SidecarProcess):
    """A sidecar child process with a budget, asked for its spend."""

    def __init__(self, upstream: str, config: Path, state: str) -> None:
        super().__init__(upstream, SIDECAR_STATE=state, SIDECAR_CONFIG=str(config))

    async def spent(self, budget: str = "all") -> float:
        async with aiohttp.ClientSession() as s, s.get(self.metrics_url + "/budgets") as r:
            data: dict[str, Any] = await r.json()
        return float(next(b["spent"] for b in data["budgets"] if b["name"] == budget))

    async def request(self, session: aiohttp.ClientSession, sid: str) -> None:
        async with session.post(self.url + "/v1/chat/completions",
                                json={"model": "gpt-4o-mini", "stream": True},
                                headers={"X-Script": sid}) as r:
            await r.read()


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text("budgets:\n  - name: all\n    window: day\n    limit_tokens: 100000000\n")
    return cfg


async def test_kill_9_loses_at_most_about_a_second(tmp_path: Path) -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    sid = upstream.add(Script(chunks=[chat_chunks("ok", 1, usage=USAGE)]))
    state = f"sqlite:///{tmp_path}/state.db"
    sc = Sidecar(upstream.url, _config(tmp_path), state)
    await sc.start()
    done: list[float] = []  # completion times of requests, 10 tokens each
    try:
        async with aiohttp.ClientSession() as s:
            t_end = time.monotonic() + 3.0
            while time.monotonic() < t_end:
                await sc.request(s, sid)
                done.append(time.monotonic())
        killed_at = time.monotonic()
        await sc.stop(signal.SIGKILL)
        sc2 = Sidecar(upstream.url, _config(tmp_path), state)
        await sc2.start()
        spent = await sc2.spent()
        await sc2.stop()
    finally:
        await sc.stop(signal.SIGKILL)
        await upstream.stop()
    total = 10 * len(done)
    before_last_second = 10 * sum(1 for t in done if t <= killed_at - 1.2)
    assert len(done) > 50
    assert before_last_second <= spent <= total, (before_last_second, spent, total)


async def test_sigterm_flushes_everything(tmp_path: Path) -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    sid = upstream.add(Script(chunks=[chat_chunks("ok", 1, usage=USAGE)]))
    state = f"sqlite:///{tmp_path}/state.db"
    sc = Sidecar(upstream.url, _config(tmp_path), state)
    await sc.start()
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(7):
                await sc.request(s, sid)
        await sc.stop(signal.SIGTERM)
        sc2 = Sidecar(upstream.url, _config(tmp_path), state)
        await sc2.start()
        assert await sc2.spent() == 70
        await sc2.stop()
    finally:
        await upstream.stop()


async def test_two_replicas_on_one_redis_see_the_same_spend(tmp_path: Path,
                                                            redis_url: str) -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    sid = upstream.add(Script(chunks=[chat_chunks("ok", 1, usage=USAGE)]))
    a = Sidecar(upstream.url, _config(tmp_path), redis_url)
    b = Sidecar(upstream.url, _config(tmp_path), redis_url)
    await a.start()
    await b.start()
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                await a.request(s, sid)
            for _ in range(3):
                await b.request(s, sid)
        # Within two checkpoints each replica has pushed its spend, then read the other's back.
        async def both() -> list[float]:
            return [await a.spent(), await b.spent()]

        await eventually(lambda: _equal_to(both(), [80, 80]), what="both replicas at 80")
    finally:
        await a.stop()
        await b.stop()
        await upstream.stop()


async def _equal_to(got: Any, expected: Any) -> Any:
    value = await got
    return value == expected or None


async def test_sighup_reloads_budgets_and_refuses_a_broken_file(tmp_path: Path) -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    cfg = _config(tmp_path)
    sc = Sidecar(upstream.url, cfg, "memory://")
    log = tmp_path / "sidecar.log"
    with log.open("wb") as err:
        await sc.start(stderr=err.fileno())
    try:
        async def names() -> list[str]:
            async with aiohttp.ClientSession() as s, s.get(sc.metrics_url + "/budgets") as r:
                return [b["name"] for b in (await r.json())["budgets"]]

        assert await names() == ["all"]
        cfg.write_text("budgets:\n  - name: reloaded\n    window: hour\n    limit_usd: 5\n")
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: _equal_to(names(), ["reloaded"]), what="the reload")
        cfg.write_text("budgets: [oops\n")  # invalid YAML: refused, the running config kept
        sc.proc.send_signal(signal.SIGHUP)
        eventually_sync(lambda: "config reload refused" in log.read_text(errors="replace"),
                        what="the refusal in the log")
        assert await names() == ["reloaded"] and sc.proc.returncode is None
    finally:
        await sc.stop()
        await upstream.stop()
