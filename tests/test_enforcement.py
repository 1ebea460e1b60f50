"""Budgets over loopback: crossing mid-stream, 429 before upstream, cut-off, webhook, reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from sidecar.budgets import Budget
from sidecar.config import Secret

from .conftest import Script, Stack, StackFactory, chat_chunks, eventually, serve, sse

USAGE = {"prompt_tokens": 21, "completion_tokens": 97, "total_tokens": 118}


def words(n: int) -> list[bytes]:
    return [sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {
        "content": f"word{i} "}}]}, done=False) for i in range(n)]


async def post(stack: Stack, sid: str, path: str = "/v1/chat/completions",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(
            stack.proxy_url + path, data=orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                                                       "messages": []}),
            headers={"X-Script": sid, "Authorization": "Bearer sk-a", **(headers or {})}) as r:
        return r.status, await r.read()


async def test_block_budget_rejects_in_the_callers_format(stack_factory: StackFactory) -> None:
    stack = await stack_factory(budgets=(Budget("tiny", {}, "day", limit_tokens=100,
                                                action="block"),))
    sid = stack.upstream.add(Script(chunks=[chat_chunks("hello", 2, usage=USAGE)]))
    assert (await post(stack, sid))[0] == 200  # 118 tokens settle: over the limit
    seen = len(stack.upstream.requests)
    status, body = await post(stack, sid)
    assert status == 429 and orjson.loads(body)["error"]["type"] == "budget_exceeded"
    status, body = await post(stack, sid, "/v1/messages", {"anthropic-version": "2023-06-01"})
    assert status == 429 and orjson.loads(body)["error"]["type"] == "rate_limit_error"
    status, body = await post(stack, sid, "/v1beta/models/gemini-2.5-pro:streamGenerateContent")
    assert status == 429 and orjson.loads(body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert len(stack.upstream.requests) == seen  # nothing reached the upstream
    assert stack.value("llm_requests_total", outcome="rejected", code="429") == 3
    assert stack.value("llm_tokens_total", source="estimated") == 0  # rejections cost nothing
    assert stack.value("llm_budget_usage_ratio", budget="tiny") == 1.18


async def test_ratio_crosses_each_threshold_while_the_stream_runs(
        stack_factory: StackFactory) -> None:
    stack = await stack_factory(budgets=(Budget("live", {"model": "gpt-4o*"}, "hour",
                                                limit_tokens=200, thresholds=(0.25, 0.5, 1.0)),))
    sid = stack.upstream.add(Script(chunks=[*words(150), b"data: [DONE]\n\n"], delay=0.01))
    task = asyncio.create_task(post(stack, sid), name="long-stream")
    crossed_mid_stream: set[float] = set()
    async with aiohttp.ClientSession() as s:
        while not task.done():
            async with s.get(stack.metrics_url + "/metrics") as r:
                text = await r.text()
            ratio = in_flight = 0.0
            for line in text.splitlines():
                if line.startswith('llm_budget_usage_ratio{budget="live"}'):
                    ratio = float(line.rsplit(" ", 1)[1])
                if line.startswith("llm_streams_in_flight{"):
                    in_flight = float(line.rsplit(" ", 1)[1])
            if in_flight == 1:
                crossed_mid_stream |= {t for t in (0.25, 0.5, 1.0) if ratio >= t}
            await asyncio.sleep(0.05)
    assert (await task)[0] == 200
    assert crossed_mid_stream == {0.25, 0.5, 1.0}


async def test_stream_crossing_a_hard_limit_is_cut_off_cleanly(
        stack_factory: StackFactory) -> None:
    stack = await stack_factory(budgets=(Budget("hard", {}, "day", limit_tokens=60,
                                                action="block", cut_off_streams=True),))
    sid = stack.upstream.add(Script(chunks=[*words(200), b"data: [DONE]\n\n"], delay=0.002))
    status, body = await post(stack, sid)
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert orjson.loads(events[-2][6:])["error"]["type"] == "budget_exceeded"
    assert all(e.startswith(b"data: {") for e in events[:-1])  # no frame split in half
    rec = await stack.wait_record()
    assert rec["outcome"] == "cut_off" and 60 <= rec["output_tokens"] < 200
    assert stack.value("llm_requests_total", outcome="cut_off") == 1


async def test_cost_is_counted_and_unknown_models_are_not_guessed(stack: Stack) -> None:
    sid = stack.upstream.add(Script(chunks=[chat_chunks("hi", 2, usage=USAGE)]))
    await post(stack, sid)
    expect = (21 * 0.15 + 97 * 0.60) / 1e6  # gpt-4o-mini list prices
    assert abs(stack.value("llm_cost_usd_total", model="gpt-4o-mini") - expect) < 1e-12
    assert stack.records[-1]["cost_usd"] == round(expect, 8)
    sid = stack.upstream.add(Script(chunks=[chat_chunks("hi", 2, model="my-llm", usage=USAGE)]))
    async with aiohttp.ClientSession() as s, s.post(
            stack.proxy_url + "/v1/chat/completions",
            json={"model": "my-llm", "stream": True}, headers={"X-Script": sid}) as r:
        await r.read()
    assert stack.value("llm_unpriced_tokens_total", model="my-llm") == 118
    assert stack.value("llm_cost_usd_total", model="my-llm") == 0


async def test_webhook_fires_once_per_threshold_with_retry(stack_factory: StackFactory) -> None:
    received: list[dict[str, object]] = []
    attempts = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return web.Response(status=503)  # the first delivery fails: it must be retried
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, port = await serve(app)
    try:
        stack = await stack_factory(
            webhook_url=f"http://127.0.0.1:{port}/hook",
            budgets=(Budget("hooked", {}, "day", limit_tokens=200, thresholds=(0.5, 1.0)),))
        sid = stack.upstream.add(Script(chunks=[chat_chunks("hi", 2, usage=USAGE)]))
        # 118 tokens cross 0.5 (the first delivery fails and is retried), 236 cross 1.0.
        for expected in (1, 2):
            await post(stack, sid)
            await eventually(lambda n=expected: len(received) >= n,
                             what=f"webhook delivery {expected}")
        # 354 cross nothing new: nothing is sent within a few checks (each second) after it.
        # (A negative check: a slow machine can only make it pass, never fail, wrongly.)
        await post(stack, sid)
        await asyncio.sleep(3 * 1.0)
    finally:
        await runner.cleanup()
    assert sorted(r["threshold"] for r in received) == [0.5, 1.0]  # type: ignore[type-var]
    assert all(r["name"] == "hooked" and r["event"] == "budget_threshold_crossed"
               for r in received)


async def test_reload_applies_valid_config_refuses_invalid_and_keeps_streams(
        stack_factory: StackFactory, tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    stack = await stack_factory()
    gate = asyncio.Event()  # the stream stays open half-way until both reloads are done
    sid = stack.upstream.add(Script(chunks=[*words(40), b"data: [DONE]\n\n"], gate=gate,
                                    gate_at=20))
    task = asyncio.create_task(post(stack, sid), name="stream-across-reload")
    await eventually(lambda: stack.upstream.written.get(sid), what="the stream under way")
    cfg.write_text(f"upstream: {stack.upstream.url}\nbudgets:\n  - name: new\n"
                   "    window: day\n    limit_tokens: 1000\n"
                   "prices:\n  gpt-4o-mini: {input: 1, output: 1}\n")
    assert stack.apps.reload_from(str(cfg))
    assert [b.name for b in stack.apps.ledger.budgets] == ["new"]
    cfg.write_text("budgets:\n  - name: broken\n    window: fortnight\n")
    assert not stack.apps.reload_from(str(cfg))
    assert [b.name for b in stack.apps.ledger.budgets] == ["new"]
    assert not task.done()
    gate.set()
    status, body = await task
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")


async def test_budgets_view_and_admin_token(stack_factory: StackFactory) -> None:
    stack = await stack_factory(admin_token=Secret("s3cret"),
                                budgets=(Budget("v", {}, "week", limit_usd=5.0),))
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.metrics_url + "/budgets") as r:
            assert r.status == 401
        async with s.get(stack.metrics_url + "/budgets",
                         headers={"Authorization": "Bearer s3cret"}) as r:
            data = await r.json()
    (b,) = data["budgets"]
    assert (b["name"], b["unit"], b["limit"], b["spent"]) == ("v", "usd", 5.0, 0)


async def test_a_prompt_that_would_cross_the_limit_is_refused(
        stack_factory: StackFactory) -> None:
    """Admission weighs the prompt estimate plus the budget's admit_margin: a request whose
    prompt alone would take a blocking budget over its limit never reaches the upstream."""
    prompt = "lorem ipsum " * 300  # about 600 tokens (gpt-4o-mini: exact)
    margin = Budget("margin", {}, "day", limit_tokens=500, action="block")
    lax = Budget("lax", {}, "day", limit_tokens=500, action="block", admit_margin=None)
    for budget, expected in ((margin, 429), (lax, 200)):
        stack = await stack_factory(budgets=(budget,))
        sid = stack.upstream.add(Script(chunks=[chat_chunks("hello", 2, usage=USAGE)]))
        async with aiohttp.ClientSession() as s, s.post(
                stack.proxy_url + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "stream": True,
                      "messages": [{"role": "user", "content": prompt}]},
                headers={"X-Script": sid}) as r:
            assert r.status == expected, budget.name
            body = await r.read()
        if expected == 429:
            assert b"prompt estimate" in body and not stack.upstream.requests
    # a short prompt passes the margin budget while it has room
    stack = await stack_factory(budgets=(margin,))
    sid = stack.upstream.add(Script(chunks=[chat_chunks("hello", 2, usage=USAGE)]))
    assert (await post(stack, sid))[0] == 200
