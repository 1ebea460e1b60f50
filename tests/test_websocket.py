"""WebSockets through the sidecar: a real aiohttp upstream over loopback, real clients (the
openai SDK's realtime client, aiohttp's), every frame compared with a direct connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI

from sidecar.budgets import Budget
from sidecar.mock_realtime import GEMINI_LIVE_PATH, make_realtime_routes
from sidecar.tokens import Tokenizers

from .conftest import Stack, StackFactory, start_stack, steady, stop_stack

KEY = "sk-realtime-test-00000000000000"


class Upstream:
    """A WebSocket upstream: the mock Realtime and Live sessions, an echo that records what it
    got, a scripted closer, and a refusal."""

    def __init__(self, tokenizers: Tokenizers, pace: float = 0.0) -> None:
        self.app = web.Application()
        make_realtime_routes(self.app, tokenizers, pace)
        self.app.router.add_get("/echo", self.echo)
        self.app.router.add_get("/v1/refuse", self.refuse)
        self.app.router.add_get("/flood", self.flood)
        self.received: list[tuple[WSMsgType, Any, Any]] = []
        self.handshakes: list[dict[str, str]] = []
        self.closed: asyncio.Event = asyncio.Event()
        self.sent = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def echo(self, request: web.Request) -> web.WebSocketResponse:
        """Echo every message; relay pings as pongs by hand; 'close <code> <reason>' closes."""
        self.handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("realtime", "chat"), autoping=False,
                                   autoclose=False, max_msg_size=32 * 2**20)
        ws.headers["X-Upstream-Session"] = "up-1"
        await ws.prepare(request)
        try:
            while True:
                msg = await ws.receive()
                self.received.append((msg.type, msg.data, msg.extra))
                if msg.type is WSMsgType.TEXT and msg.data.startswith("close "):
                    _, code, reason = msg.data.split(" ", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
                elif msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.CLOSE:
                    await ws.close(code=msg.data, message=b"echo: " + msg.extra.encode())
                    break
                else:
                    break
        finally:
            self.closed.set()
        return ws

    async def refuse(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "bad key"}}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})

    async def flood(self, request: web.Request) -> web.WebSocketResponse:
        """Send 1 MiB binary messages as fast as the connection takes them."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        block = bytes(2**20)
        with contextlib.suppress(ConnectionError):
            for _ in range(int(request.query.get("n", "64"))):
                await ws.send_bytes(block)
                self.sent += len(block)
        self.closed.set()
        return ws


@pytest.fixture
async def upstream(tokenizers: Tokenizers) -> AsyncIterator[Upstream]:
    up = Upstream(tokenizers, pace=0.001)
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def ws_stack(stack_factory: StackFactory, upstream: Upstream) -> Stack:
    result: Stack = await stack_factory(upstream=upstream.url)
    return result


async def realtime_session(base: str, model: str = "gpt-realtime", turns: int = 2,
                           key: str = KEY) -> list[dict[str, Any]]:
    """A voice session with the openai SDK: instructions, audio in, two responses."""
    client = AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    events: list[dict[str, Any]] = []
    try:
        async with client.realtime.connect(model=model) as conn:
            await conn.session.update(session={"type": "realtime",
                                               "instructions": "Answer in one sentence."})
            for i in range(turns):
                await conn.input_audio_buffer.append(
                    audio=base64.b64encode(bytes(24_000 * (i + 1))).decode())
                await conn.response.create()
                async for event in conn:
                    events.append(event.model_dump(exclude_none=True))
                    if event.type == "response.done":
                        break
    finally:
        await client.close()
    return events


def usages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["response"]["usage"] for e in events if e["type"] == "response.done"]


async def test_openai_sdk_session_through_the_sidecar_equals_direct(
        ws_stack: Stack, upstream: Upstream) -> None:
    direct = await realtime_session(upstream.url)
    proxied = await realtime_session(ws_stack.proxy_url)
    assert proxied == direct
    assert len(usages(direct)) == 2
    rec = await ws_stack.wait_record()
    assert rec["stream"] == "ws" and rec["outcome"] == "completed" and rec["responses"] == 2
    assert rec["closed_by"] == "client" and rec["close_code"] == 1000
    # Settled tokens are the sums of the session's response.done usages, type by type.
    u = usages(proxied)
    v = ws_stack.value
    assert v("llm_tokens_total", token_type="input", source="reported") == \
        sum(x["input_tokens"] for x in u) == rec["input_tokens"]
    assert v("llm_tokens_total", token_type="output", source="reported") == \
        sum(x["output_tokens"] for x in u) == rec["output_tokens"]
    for ours, theirs, side in (("input_audio", "audio_tokens", "input_token_details"),
                               ("output_audio", "audio_tokens", "output_token_details"),
                               ("cached_input", "cached_tokens", "input_token_details")):
        assert v("llm_tokens_total", token_type=ours) == sum(x[side][theirs] for x in u)
    assert v("llm_requests_total", stream="ws", code="101", outcome="completed") == 1
    assert v("llm_streams_in_flight") == 0
    # Live estimates ran while the session did: audio by duration, text by the tokenizer.
    live_out = v("llm_live_tokens_total", token_type="output")
    assert 0.9 < live_out / sum(x["output_tokens"] for x in u) < 1.1
    # Cost uses the audio prices (genai-prices' own calculator as the oracle).
    from genai_prices import Usage, calc_price

    expect = sum(float(calc_price(Usage(
        input_tokens=x["input_tokens"], output_tokens=x["output_tokens"],
        cache_read_tokens=x["input_token_details"]["cached_tokens"],
        input_audio_tokens=x["input_token_details"]["audio_tokens"],
        output_audio_tokens=x["output_token_details"]["audio_tokens"]),
        model_ref="gpt-realtime", provider_id="openai").total_price) for x in u)
    assert v("llm_cost_usd_total") == pytest.approx(expect, rel=1e-9)
    assert rec["cost_usd"] == pytest.approx(expect, rel=1e-6)
    text_only = sum(x["input_tokens"] * 4e-6 + x["output_tokens"] * 16e-6 for x in u)
    assert expect > 2 * text_only  # the audio prices are what made it


async def _frames(ws: aiohttp.ClientWebSocketResponse[Any], n: int) -> list[tuple[Any, Any]]:
    out = []
    for _ in range(n):
        msg = await ws.receive(timeout=10)
        out.append((msg.type, msg.data))
    return out


async def _exchange(base: str, messages: list[tuple[str, Any]], protocols: tuple[str, ...] = (),
                    headers: dict[str, str] | None = None,
                    ) -> tuple[list[tuple[Any, Any]], Any, Any, dict[str, str]]:
    """Send the messages (all at once, echoes flowing back meanwhile); return what came back,
    the chosen subprotocol, the close code and the handshake headers."""
    async with aiohttp.ClientSession() as s, s.ws_connect(
            base + "/echo", protocols=protocols, headers=headers or {}, autoping=False,
            max_msg_size=32 * 2**20) as ws:
        async def send() -> None:
            for kind, data in messages:
                if kind == "text":
                    await ws.send_str(data)
                elif kind == "binary":
                    await ws.send_bytes(data)
                else:
                    await ws.ping(data)
        sender = asyncio.create_task(send())
        got = await _frames(ws, len(messages))
        await sender
        await ws.close(code=4001, message=b"bye")
        return got, ws.protocol, ws.close_code, dict(ws._response.headers)


message = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=3000)),
    st.tuples(st.just("binary"), st.binary(max_size=3000)),
    st.tuples(st.just("binary"),
              st.integers(0, 300_000).map(lambda n: bytes(range(256)) * (n // 256))),
    st.tuples(st.just("ping"), st.binary(max_size=125)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(messages=st.lists(message, min_size=1, max_size=30))
def test_frames_are_identical_both_ways(tokenizers: Tokenizers,
                                        messages: list[tuple[str, Any]]) -> None:
    async def run() -> None:
        up = Upstream(tokenizers)
        await up.start()
        stack = await start_stack(tokenizers, upstream=up.url)
        try:
            direct = await _exchange(up.url, messages)
            up.received.clear()
            proxied = await _exchange(stack.proxy_url, messages)
            assert proxied[:3] == direct[:3]
            expect = [(WSMsgType.PONG if k == "ping" else
                       WSMsgType.TEXT if k == "text" else WSMsgType.BINARY, d)
                      for k, d in messages]
            assert proxied[0] == expect
            # The upstream got the same frames, in order, then the client's close code.
            await asyncio.wait_for(up.closed.wait(), 5)
            assert [(t, d) for t, d, _ in up.received] == \
                [(WSMsgType.PING if k == "ping" else t, d) for (t, d), (k, _) in
                 zip(expect, messages, strict=True)] + [(WSMsgType.CLOSE, 4001)]
            assert up.received[-1][2] == "bye"
        finally:
            await stop_stack(stack)
            await up.stop()
    asyncio.run(run())


async def test_handshake_headers_subprotocols_and_key_rules(
        ws_stack: Stack, upstream: Upstream) -> None:
    protocols = ("realtime", f"openai-insecure-api-key.{KEY}", "openai-beta.realtime-v1")
    got, chosen, code, headers = await _exchange(
        ws_stack.proxy_url, [("text", "hi")], protocols=protocols,
        headers={"OpenAI-Beta": "realtime=v1", "X-Team": "voice"})
    assert got == [(WSMsgType.TEXT, "hi")] and chosen == "realtime" and code == 4001
    assert headers["X-Upstream-Session"] == "up-1"  # the upstream's own 101 headers
    seen = upstream.handshakes[-1]
    assert [p.strip() for p in seen["Sec-WebSocket-Protocol"].split(",")] == list(protocols)
    assert seen["OpenAI-Beta"] == "realtime=v1"
    rec = await ws_stack.wait_record()
    assert rec["key"].startswith("k-") and KEY not in orjson.dumps(rec).decode()
    assert rec["closed_by"] == "client" and rec["close_code"] == 4001
    assert rec["protocol"] is None  # a generic session: relayed, not metered


async def test_close_codes_and_reasons_are_relayed_from_the_upstream(
        ws_stack: Stack, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_stack.proxy_url + "/echo") as ws:
        await ws.send_str("close 4002 session over")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "session over")
    rec = await ws_stack.wait_record()
    assert rec["closed_by"] == "upstream" and rec["close_code"] == 4002
    assert rec["outcome"] == "completed"


async def test_a_refused_handshake_returns_the_upstreams_status(
        ws_stack: Stack, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(ws_stack.proxy_url + "/v1/refuse")
        assert err.value.status == 401
        assert err.value.headers is not None
        assert err.value.headers.get("WWW-Authenticate") == "Bearer"
    assert ws_stack.value("llm_requests_total", code="401", outcome="upstream_error",
                          stream="ws") == 1


async def test_ten_megabyte_frames_and_the_size_limit(
        stack_factory: StackFactory, upstream: Upstream) -> None:
    stack = await stack_factory(upstream=upstream.url)
    big = bytes(range(256)) * (10 * 2**20 // 256)
    got, _, _, _ = await _exchange(stack.proxy_url, [("binary", big), ("text", "after")])
    assert got == [(WSMsgType.BINARY, big), (WSMsgType.TEXT, "after")]
    small = await stack_factory(upstream=upstream.url, max_ws_message=2**20)
    async with aiohttp.ClientSession() as s, s.ws_connect(small.proxy_url + "/echo") as ws:
        await ws.send_bytes(bytes(2 * 2**20))
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1009  # message too big


async def test_a_slow_reader_holds_the_upstream_back(
        stack_factory: StackFactory, upstream: Upstream) -> None:
    stack = await stack_factory(upstream=upstream.url)
    async with aiohttp.ClientSession() as s, s.ws_connect(
            stack.proxy_url + "/flood?n=256") as ws:
        # Not reading: kernel buffers fill, then the relay waits, and the upstream stops.
        held = await steady(lambda: upstream.sent)
        got = 0
        while got < 256 * 2**20:
            msg = await ws.receive(timeout=10)
            if msg.type is not WSMsgType.BINARY:
                break
            got += len(msg.data)
    print(f"\nupstream sent {held / 2**20:.0f} MiB of 256 MiB while the client read nothing")
    assert held < 64 * 2**20
    assert got == 256 * 2**20


async def test_client_disconnect_mid_response_settles_on_estimates(
        stack_factory: StackFactory, tokenizers: Tokenizers) -> None:
    slow = Upstream(tokenizers, pace=0.02)
    await slow.start()
    try:
        stack = await stack_factory(upstream=slow.url)
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(stack.proxy_url + "/v1/realtime?model=gpt-realtime")
            await ws.send_str(orjson.dumps({"type": "response.create"}).decode())
            for _ in range(12):
                await ws.receive(timeout=5)
            # Vanish without a close frame.
            assert ws._response.connection is not None
            ws._response.connection.transport.close()  # type: ignore[union-attr]
        rec = await stack.wait_record()
        assert rec["outcome"] == "client_disconnected" and rec["source"] == "estimated"
        assert rec["output_tokens"] > 0 and rec["output_audio_tokens"] > 0
        assert stack.value("llm_tokens_total", token_type="output_audio",
                           source="estimated") == rec["output_audio_tokens"]
        assert stack.value("llm_streams_in_flight") == 0
    finally:
        await slow.stop()


async def test_upstream_vanishing_mid_session_closes_the_client(
        ws_stack: Stack, upstream: Upstream) -> None:
    async def vanish(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(orjson.dumps({"type": "session.created",
                                        "session": {"model": "gpt-realtime"}}).decode())
        await ws.send_str(orjson.dumps({"type": "response.created",
                                        "response": {"id": "r"}}).decode())
        await ws.send_str(orjson.dumps({"type": "response.output_text.delta",
                                        "response_id": "r", "delta": "so far so good"}).decode())
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.close()
        return ws

    upstream.app.router._frozen = False
    upstream.app.router.add_get("/v1/vanish/realtime", vanish)
    async with aiohttp.ClientSession() as s, s.ws_connect(
            ws_stack.proxy_url + "/v1/vanish/realtime") as ws:
        kinds = []
        while True:
            msg = await ws.receive(timeout=5)
            kinds.append(msg.type)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
    assert kinds[:3] == [WSMsgType.TEXT] * 3
    rec = await ws_stack.wait_record()
    assert rec["outcome"] == "upstream_error" and rec["source"] == "estimated"
    assert rec["output_tokens"] == 4 and rec["model"] == "gpt-realtime"


async def test_budgets_refuse_the_handshake_and_close_a_session_mid_way(
        stack_factory: StackFactory, tokenizers: Tokenizers) -> None:
    slow = Upstream(tokenizers, pace=0.01)
    await slow.start()
    try:
        stack = await stack_factory(upstream=slow.url, budgets=(
            Budget("voice", {}, "day", limit_tokens=150, action="block", cut_off_streams=True),))
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(stack.proxy_url + "/v1/realtime?model=gpt-realtime")
            await ws.send_str(orjson.dumps({"type": "response.create"}).decode())
            events = []
            while True:
                msg = await ws.receive(timeout=5)
                if msg.type is not WSMsgType.TEXT:
                    break
                events.append(orjson.loads(msg.data))
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008)
            assert "voice" in msg.extra
            err = events[-1]
            assert err["type"] == "error" and err["error"]["code"] == "budget_exceeded"
            await ws.close()
            rec = await stack.wait_record()
            assert rec["outcome"] == "cut_off" and rec["close_code"] == 1008
            assert stack.value("llm_budget_cut_offs_total", budget="voice") == 1
            # Spent: a new session is refused at the handshake, in OpenAI's error shape.
            async with s.get(stack.proxy_url + "/v1/realtime?model=gpt-realtime", headers={
                    "Upgrade": "websocket", "Connection": "Upgrade",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": base64.b64encode(bytes(16)).decode()}) as r:
                assert r.status == 429
                assert (await r.json())["error"]["code"] == "budget_exceeded"
        assert stack.value("llm_budget_rejections_total", budget="voice") == 1
    finally:
        await slow.stop()


async def test_gemini_live_session_is_metered_per_turn(ws_stack: Stack) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(
            ws_stack.proxy_url + GEMINI_LIVE_PATH + "?key=AIzaSyTESTKEY000000000000000000") as ws:
        await ws.send_str(orjson.dumps({"setup": {
            "model": "models/gemini-live-2.5-flash-preview",
            "systemInstruction": {"parts": [{"text": "You are a radio host."}]}}}).decode())
        assert orjson.loads((await ws.receive(timeout=5)).data) == {"setupComplete": {}}
        metas = []
        for turn in range(2):
            await ws.send_str(orjson.dumps({"realtimeInput": {"audio": {
                "data": base64.b64encode(bytes(32_000 * (turn + 1))).decode(),
                "mimeType": "audio/pcm;rate=16000"}}}).decode())
            await ws.send_str(orjson.dumps({"realtimeInput": {"text": "What is on?"}}).decode())
            while True:
                msg = await ws.receive(timeout=5)
                assert msg.type is WSMsgType.BINARY  # Live sends JSON in binary frames
                obj = orjson.loads(msg.data)
                if "usageMetadata" in obj:
                    metas.append(obj["usageMetadata"])
                    break
    rec = await ws_stack.wait_record()
    assert rec["protocol"] == "gemini-live" and rec["responses"] == 2
    assert rec["model"] == "gemini-live-2.5-flash-preview" and rec["provider"] == "gemini"
    assert rec["input_tokens"] == sum(m["promptTokenCount"] for m in metas)
    assert rec["output_audio_tokens"] == sum(m["responseTokenCount"] for m in metas)
    assert ws_stack.value("llm_tokens_total", model="gemini-live-2.5-flash-preview",
                          token_type="input_audio") == \
        sum(m["promptTokensDetails"][1]["tokenCount"] for m in metas)
    assert rec["cost_usd"] and rec["cost_usd"] > 0
    assert "AIza" not in orjson.dumps(rec).decode()


async def test_idle_sessions_time_out_and_shutdown_closes_sessions(
        stack_factory: StackFactory, upstream: Upstream) -> None:
    stack = await stack_factory(upstream=upstream.url, read_timeout=0.3)
    async with aiohttp.ClientSession() as s, s.ws_connect(stack.proxy_url + "/echo") as ws:
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    rec = await stack.wait_record()
    assert rec["outcome"] == "timeout"
    other = await stack_factory(upstream=upstream.url)
    async with aiohttp.ClientSession() as s, s.ws_connect(other.proxy_url + "/echo") as ws:
        await ws.send_str("x")
        assert (await ws.receive(timeout=5)).data == "x"
        assert other.value("llm_streams_in_flight") == 1
        stopping = asyncio.create_task(other.running.stop())
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
        await stopping
