"""`--workers 2` as real processes: one port shared by both, one /metrics summing both, budgets
that hold across them, a worker killed with SIGKILL replaced without touching the other's
streams, and SIGTERM draining both."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from .conftest import (
    Script,
    ScriptedUpstream,
    SidecarProcess,
    chat_chunks,
    eventually,
    promtool,
)

USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    await up.start()
    yield up
    await up.stop()


def _workers(tmp: Path, upstream: str, config: str = "") -> SidecarProcess:
    (tmp / "sidecar.yaml").write_text(f"upstream: {upstream}\n{config}")
    return SidecarProcess(upstream, SIDECAR_WORKERS="2", SIDECAR_CONFIG=str(tmp / "sidecar.yaml"),
                          SIDECAR_STATE=f"sqlite:///{tmp / 'state.db'}",
                          SIDECAR_RECORDS=str(tmp / "records.jsonl"))


def _records(tmp: Path) -> list[dict[str, object]]:
    path = tmp / "records.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() \
        else []


async def _post(url: str, sid: str) -> tuple[int, bytes]:
    # A connection per request: SO_REUSEPORT spreads connections, not requests.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.post(url + "/v1/chat/completions", headers={"X-Script": sid},
                   json={"model": "gpt-4o-mini", "stream": True}) as r:
        return r.status, await r.read()


async def _metric(sidecar: SidecarProcess, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(sidecar.metrics_url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(p) for p in children]


async def test_two_workers_share_one_port_one_metrics_and_budgets(
        upstream: ScriptedUpstream, tmp_path: Path) -> None:
    sidecar = _workers(tmp_path, upstream.url, (
        "budgets:\n  - {name: shared, match: {model: 'gpt-4o-mini'}, window: day, "
        "limit_tokens: 500, action: block}\n"))
    await sidecar.start()
    try:
        body = chat_chunks("counted by whichever worker answers", 6, usage=USAGE)
        sent, statuses = 0, []
        while sent < 40 and 429 not in statuses:
            status, got = await _post(sidecar.url, upstream.add(Script(chunks=[body])))
            sent += 1
            statuses.append(status)
            if status == 200:
                assert got == body
        assert 429 in statuses, "500 tokens at 33 a request: the budget must run out"
        # Every worker refuses once it has read the shared spend back (within a checkpoint).
        async def twenty_refused() -> bool:
            nonlocal sent
            for _ in range(20):
                status, _ = await _post(sidecar.url, upstream.add(Script(chunks=[body])))
                sent += 1
                if status != 429:
                    return False
            return True

        await eventually(twenty_refused, every=0.2, what="20 refusals in a row")
        records = await eventually(lambda: len(r := _records(tmp_path)) == sent and r,
                                   what="every record")
        assert len(records) == sent
        assert {r["worker"] for r in records} == {0, 1}  # both answered
        assert {r["worker"] for r in records[-20:]} == {0, 1}  # and both refused
        assert await _metric(sidecar, "llm_requests_total{") == sent  # summed over both
        assert await _metric(sidecar, "llm_workers ") == 2
        assert await _metric(sidecar, "llm_sidecar_build_info{") == 1  # once, not per worker

        async def spent_seen() -> bool:  # the supervisor reads the shared spend every second
            return await _metric(sidecar, 'llm_budget_usage_ratio{budget="shared"}') >= 1.0

        await eventually(spent_seen, every=0.1, what="the budget spent on /metrics")
        async with aiohttp.ClientSession() as s, s.get(sidecar.metrics_url + "/metrics") as r:
            exposition = await r.read()
        lint = await asyncio.create_subprocess_exec(
            promtool(), "check", "metrics", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await lint.communicate(exposition)
        assert lint.returncode == 0, out
    finally:
        assert await sidecar.stop() == 0


async def test_a_killed_worker_is_replaced_and_the_other_keeps_its_streams(
        upstream: ScriptedUpstream, tmp_path: Path) -> None:
    sidecar = _workers(tmp_path, upstream.url)
    await sidecar.start()
    try:
        # Both workers accept before the streams start (the readiness answer may come from the
        # first one up), and enough streams that both serve some: 16 land on one worker with
        # probability 2^-15.
        quick = chat_chunks("warm", 4, usage=USAGE)
        warm = 0
        for _ in range(60):
            if {r["worker"] for r in _records(tmp_path)} == {0, 1}:
                break
            await _post(sidecar.url, upstream.add(Script(chunks=[quick])))
            warm += 1
            # Its record is written just after the client saw the end.
            await eventually(lambda n=warm: len(_records(tmp_path)) == n,
                             what="the record")
        body = chat_chunks("slow enough to be cut " * 4, 4, usage=USAGE)
        chunks = [body[i:i + 40] for i in range(0, len(body), 40)]
        gate = asyncio.Event()  # every stream is under way, and held, when the worker dies
        sids = [upstream.add(Script(chunks=chunks, gate=gate, gate_at=1)) for _ in range(16)]
        streams = [asyncio.create_task(_post(sidecar.url, sid), name=f"stream-{i}")
                   for i, sid in enumerate(sids)]
        await eventually(lambda: all(upstream.written.get(sid) for sid in sids),
                         what="16 streams under way")
        victim = _worker_pids(sidecar.pid)[0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: not os.path.exists(f"/proc/{victim}/stat")
                         or _state(victim) == "Z", what="the worker gone")
        gate.set()
        results = await asyncio.gather(*streams, return_exceptions=True)
        whole = [r for r in results if isinstance(r, tuple) and r == (200, body)]
        broken = [r for r in results if not (isinstance(r, tuple) and r == (200, body))]
        assert whole, "the surviving worker's streams complete"
        assert all(isinstance(r, aiohttp.ClientError) or r[0] == 200 for r in broken)
        # Every stream the survivor served completed and was recorded by it.
        # A record is written just after the client saw the last byte.
        records = await eventually(lambda: (r := _records(tmp_path)[warm:]) and
                                   len(r) >= len(whole) and r, what="the survivor's records")
        assert len(records) == len(whole) and len({r["worker"] for r in records}) == 1

        async def replaced() -> bool:
            return await _metric(sidecar, "llm_workers ") == 2

        await eventually(replaced, every=0.1, what="two workers again")
        assert await _metric(sidecar, "llm_worker_restarts_total") == 1
        assert victim not in _worker_pids(sidecar.pid)
        status, got = await _post(sidecar.url, upstream.add(Script(chunks=[body])))
        assert (status, got) == (200, body)
    finally:
        assert await sidecar.stop() == 0


async def test_sigterm_drains_both_workers(upstream: ScriptedUpstream, tmp_path: Path) -> None:
    sidecar = _workers(tmp_path, upstream.url)
    await sidecar.start()
    body = chat_chunks("drained to the last byte " * 3, 5, usage=USAGE)
    chunks = [body[i:i + 30] for i in range(0, len(body), 30)]
    gate = asyncio.Event()  # every stream is under way, and held, when SIGTERM arrives
    sids = [upstream.add(Script(chunks=chunks, gate=gate, gate_at=1)) for _ in range(12)]
    streams = [asyncio.create_task(_post(sidecar.url, sid), name=f"drained-{i}")
               for i, sid in enumerate(sids)]
    await eventually(lambda: all(upstream.written.get(sid) for sid in sids),
                     what="12 streams under way")
    assert len(_worker_pids(sidecar.pid)) == 2
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:  # both workers stopped accepting: draining
        try:
            socket.create_connection(("127.0.0.1", sidecar.port), timeout=1).close()
        except OSError:
            return True
        return False

    await eventually(refused, what="new connections refused")
    gate.set()
    assert all(r == (200, body) for r in await asyncio.gather(*streams))
    code = await sidecar.stop()
    assert code == 0
    records = _records(tmp_path)
    assert len(records) == 12 and all(r["outcome"] == "completed" for r in records)
    # The kernel spreads connections over the workers by hash: all 12 on one is a 1-in-2048.
    assert {r["worker"] for r in records} == {0, 1}
