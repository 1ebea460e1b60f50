"""The proxy over real loopback sockets: byte transparency, live and settled accounting, faults."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar.meter import Meter
from sidecar.tokens import Tokenizers

from .conftest import Script, Stack, StackFactory, chat_chunks, eventually, split_at, sse

KEY = "sk-test-secret-key-1234567890"
TEXT = ("Streaming accounting has to be right even when a gateway re-chunks text into tiny "
        "fragments that split tokens, words and even multi-byte characters: 你好，世界！ "
        "It's the estimate at the end that must equal tiktoken's count. ") * 4
_TOK = Tokenizers()
USAGE = {"prompt_tokens": 21, "completion_tokens": 97, "total_tokens": 118,
         "prompt_tokens_details": {"cached_tokens": 5},
         "completion_tokens_details": {"reasoning_tokens": 0}}


def chat_body(stream: bool = True, model: str = "gpt-4o-mini", **extra: object) -> bytes:
    return orjson.dumps({"model": model, "stream": stream,
                         "messages": [{"role": "user", "content": "Say hi"}], **extra})


async def post(stack: Stack, sid: str, body: bytes, path: str = "/v1/chat/completions",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    hdrs = {"Authorization": f"Bearer {KEY}", "X-Script": sid,
            "Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
            URL(stack.proxy_url + path, encoded=True), data=body, headers=hdrs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_stream_bytes_identical_and_settled_as_reported(stack: Stack) -> None:
    body = chat_chunks(TEXT, 3, usage=USAGE)
    sid = stack.upstream.add(Script(chunks=split_at(body, [17, 100, 101, 555, 2000])))
    status, headers, got = await post(stack, sid, chat_body())
    assert status == 200 and got == body
    assert headers["Content-Type"] == "text/event-stream"
    lbl = {"provider": "openai", "model": "gpt-4o-mini"}
    assert stack.value("llm_tokens_total", token_type="input", source="reported", **lbl) == 21
    assert stack.value("llm_tokens_total", token_type="output", source="reported", **lbl) == 97
    assert stack.value("llm_tokens_total", token_type="cached_input", **lbl) == 5
    assert stack.value("llm_requests_total", outcome="completed", code="200", stream="true") == 1
    assert stack.value("llm_streams_in_flight") == 0
    rec = stack.records[-1]
    assert rec["source"] == "reported" and rec["output_tokens"] == 97
    assert rec["finish_reason"] == "stop" and rec["ttft_seconds"] is not None
    # The live counter estimated the same stream as it passed.
    tok = Tokenizers().for_model("gpt-4o-mini")
    assert stack.value("llm_live_tokens_total", token_type="output") == tok.count(TEXT)


async def test_stream_without_usage_settles_estimated_exactly(stack: Stack,
                                                              tokenizers: Tokenizers) -> None:
    body = chat_chunks(TEXT, 3, model="gpt-4.1")
    sid = stack.upstream.add(Script(chunks=split_at(body, list(range(0, len(body), 5)))))
    status, _, got = await post(stack, sid, chat_body(model="gpt-4.1"))
    assert status == 200 and got == body
    expect = tokenizers.for_model("gpt-4.1").count(TEXT)
    est = stack.value("llm_tokens_total", token_type="output", source="estimated")
    assert abs(est - expect) <= 0.01 * expect
    assert est == expect  # in fact exact: counting is split-invariant
    prompt = stack.value("llm_tokens_total", token_type="input", source="estimated")
    assert prompt == tokenizers.for_model("gpt-4.1").count("user") + tokenizers.for_model(
        "gpt-4.1").count("Say hi") + 3 + 3
    assert stack.records[-1]["source"] == "estimated"


async def test_live_counter_moves_while_stream_is_running(stack: Stack) -> None:
    words = TEXT.split(" ")
    chunks = [sse({"model": "gpt-4o-mini", "choices": [
        {"index": 0, "delta": {"content": w + " "}}]}, done=False) for w in words]
    # The upstream holds the stream open half-way until the test has looked.
    gate = asyncio.Event()
    sid = stack.upstream.add(Script(chunks=[*chunks, b"data: [DONE]\n\n"], gate=gate,
                                    gate_at=len(chunks) // 2))

    async def live_output() -> float:
        async with aiohttp.ClientSession() as s, s.get(stack.metrics_url + "/metrics") as r:
            text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("llm_live_tokens_total{")
                   and 'token_type="output"' in line)

    task = asyncio.create_task(post(stack, sid, chat_body()), name="slow-stream")
    mid_value = await eventually(live_output, what="live output tokens on /metrics")
    assert stack.value("llm_streams_in_flight", model="gpt-4o-mini") == 1
    assert stack.value("llm_tokens_total") == 0  # nothing settled yet
    gate.set()
    await task
    final = stack.value("llm_live_tokens_total", token_type="output")
    assert mid_value < final
    assert stack.value("llm_streams_in_flight", model="gpt-4o-mini") == 0


@given(cuts=st.lists(st.integers(0, 10_000), max_size=60), frag=st.sampled_from([1, 3, 8]),
       with_usage=st.booleans())
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_random_rechunking_keeps_bytes_and_accounting(
        stack: Stack, cuts: list[int], frag: int, with_usage: bool) -> None:
    body = chat_chunks(TEXT, frag, usage=USAGE if with_usage else None)
    sid = stack.upstream.add(Script(chunks=split_at(body, cuts)))
    status, _, got = await post(stack, sid, chat_body())
    assert status == 200 and got == body
    rec = stack.records[-1]
    assert rec["request_id"] and rec["output_tokens"] == (
        97 if with_usage else _TOK.for_model("gpt-4o-mini").count(TEXT))
    assert rec["estimated_output_tokens"] == _TOK.for_model("gpt-4o-mini").count(TEXT)


async def test_non_streaming_body_is_forwarded_and_settled(stack: Stack) -> None:
    answer = {"id": "x", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                           "finish_reason": "stop"}], "usage": USAGE}
    body = orjson.dumps(answer)
    sid = stack.upstream.add(Script(chunks=[body[:10], body[10:]], content_length=True,
                                    headers={"Content-Type": "application/json",
                                             "X-Upstream": "yes"}))
    status, headers, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == body
    assert headers["X-Upstream"] == "yes" and headers["Content-Length"] == str(len(body))
    assert stack.value("llm_tokens_total", token_type="output", source="reported") == 97
    assert stack.value("llm_requests_total", stream="false", outcome="completed") == 1
    assert stack.records[-1]["response_model"] == "gpt-4o-mini-2024-07-18"


async def test_gzip_passes_through_untouched_and_is_metered(stack: Stack) -> None:
    body = chat_chunks(TEXT, 5, usage=USAGE)
    packed = gzip.compress(body)
    sid = stack.upstream.add(Script(chunks=split_at(packed, [50, 51, 300]), headers={
        "Content-Type": "text/event-stream", "Content-Encoding": "gzip"}))
    status, headers, got = await post(stack, sid, chat_body(),
                                      headers={"Accept-Encoding": "gzip"})
    assert status == 200 and got == packed and headers["Content-Encoding"] == "gzip"
    assert stack.value("llm_tokens_total", token_type="output", source="reported") == 97
    assert stack.value("llm_live_tokens_total", token_type="output") > 0


async def test_request_forwarded_faithfully(stack: Stack) -> None:
    sid = stack.upstream.add(Script(chunks=[b"{}"], headers={"Content-Type": "application/json"}))
    body = chat_body(stream=False)
    await post(stack, sid, body, path="/v1/chat/completions?api-version=2024-06-01&x=%2F",
               headers={"X-Custom": "1", "Connection": "keep-alive, X-Drop", "X-Drop": "gone"})
    seen = stack.upstream.requests[-1]
    assert seen["path"] == "/v1/chat/completions?api-version=2024-06-01&x=%2F"
    assert seen["body"] == body
    assert seen["headers"]["X-Custom"] == "1"
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"
    assert "X-Drop" not in seen["headers"]  # named in Connection: hop-by-hop
    assert seen["headers"]["Host"] == stack.upstream.url.split("//")[1]


async def test_the_upstream_gets_no_header_the_client_did_not_send(stack: Stack) -> None:
    sid = stack.upstream.add(Script(chunks=[b"{}"], headers={"Content-Type": "application/json"}))
    async with aiohttp.ClientSession() as session, session.post(
            stack.proxy_url + "/v1/chat/completions", data=chat_body(stream=False),
            headers={"Authorization": f"Bearer {KEY}", "X-Script": sid},
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type")) as r:
        assert r.status == 200
    assert sorted(stack.upstream.requests[-1]["headers"]) == [
        "Authorization", "Content-Length", "Host", "X-Script"]


async def test_upstream_error_status_passes_through(stack: Stack) -> None:
    err = orjson.dumps({"error": {"message": "Rate limit reached", "type": "requests"}})
    sid = stack.upstream.add(Script(chunks=[err], status=429, headers={
        "Content-Type": "application/json", "Retry-After": "3"}))
    status, headers, got = await post(stack, sid, chat_body())
    assert (status, got, headers["Retry-After"]) == (429, err, "3")
    assert stack.value("llm_requests_total", code="429", outcome="upstream_error") == 1
    assert stack.records[-1]["error"] == "Rate limit reached"


async def test_unreachable_upstream_gives_clean_502(stack_factory: StackFactory) -> None:
    stack = await stack_factory(upstream="http://127.0.0.1:1")
    status, _, got = await post(stack, "none", chat_body())
    assert status == 502 and orjson.loads(got)["error"]["type"] == "upstream_error"
    assert stack.value("llm_requests_total", code="502", outcome="upstream_error") == 1


async def test_body_over_limit_gets_413(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_request_body=1000)
    status, _, got = await post(stack, "none", b"x" * 5000)
    assert status == 413 and b"max_request_body" in got
    assert stack.upstream.requests == []


async def test_bodies_with_and_without_a_declared_length(stack_factory: StackFactory) -> None:
    """A Content-Length body and a chunked one (read by different paths) reach the upstream
    byte for byte; a chunked body over the limit gets the same 413 and never leaves."""
    stack = await stack_factory(max_request_body=4000)
    body = chat_body()

    async def pieces(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 7):
            yield data[i:i + 7]

    for data in (body, pieces(body)):
        sid = stack.upstream.add(Script(chunks=[chat_chunks(TEXT, 2, usage=USAGE)]))
        async with aiohttp.ClientSession() as session, session.post(
                stack.proxy_url + "/v1/chat/completions", data=data,
                headers={"X-Script": sid, "Content-Type": "application/json"}) as resp:
            assert resp.status == 200
            await resp.read()
        assert stack.upstream.requests[-1]["body"] == body
    async with aiohttp.ClientSession() as session, session.post(
            stack.proxy_url + "/v1/chat/completions", data=pieces(b"x" * 5000),
            headers={"X-Script": "none"}) as resp:
        assert resp.status == 413 and b"max_request_body" in await resp.read()
    assert len(stack.upstream.requests) == 2
    assert stack.value("llm_requests_total", code="200") == 2


async def test_client_disconnect_mid_stream_is_settled(stack: Stack) -> None:
    chunks = [sse({"model": "gpt-4o-mini", "choices": [
        {"index": 0, "delta": {"content": "word "}}]}, done=False)] * 200
    sid = stack.upstream.add(Script(chunks=chunks, delay=0.01))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(stack.proxy_url + "/v1/chat/completions", data=chat_body(),
                                  headers={"X-Script": sid})
        await resp.content.read(200)
        resp.close()  # drop the connection mid-stream
    await stack.wait_record()
    rec = stack.records[-1]
    assert rec["outcome"] == "client_disconnected"
    assert rec["output_source"] == "estimated" and rec["output_tokens"] > 0
    assert stack.value("llm_requests_total", outcome="client_disconnected") == 1
    assert stack.value("llm_streams_in_flight") == 0


async def test_upstream_abort_mid_stream_is_upstream_error(stack: Stack) -> None:
    body = chat_chunks(TEXT, 10)
    parts = split_at(body, [200, 400, 600])
    sid = stack.upstream.add(Script(chunks=parts, abort_after=2))
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(stack, sid, chat_body())
    await stack.wait_record()
    assert stack.records[-1]["outcome"] == "upstream_error"
    assert stack.records[-1]["output_tokens"] > 0


async def test_idle_upstream_times_out(stack_factory: StackFactory) -> None:
    stack = await stack_factory(read_timeout=1.0)
    body = chat_chunks(TEXT, 10)
    sid = stack.upstream.add(Script(chunks=split_at(body, [300]), stall_after=1))
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(stack, sid, chat_body())
    await stack.wait_record()
    assert stack.records[-1]["outcome"] == "timeout"


async def test_malformed_frame_passes_through_and_is_counted(stack: Stack) -> None:
    body = b"data: {not json\n\n" + chat_chunks("fine text", 4, usage=USAGE)
    sid = stack.upstream.add(Script(chunks=[body]))
    status, _, got = await post(stack, sid, chat_body())
    assert status == 200 and got == body
    assert stack.value("llm_frame_errors_total", provider="openai") == 1
    assert stack.value("llm_tokens_total", token_type="output", source="reported") == 97


async def test_api_key_never_in_labels_or_records(stack: Stack) -> None:
    sid = stack.upstream.add(Script(chunks=[chat_chunks("hi", 2, usage=USAGE)]))
    await post(stack, sid, chat_body())
    async with aiohttp.ClientSession() as s, s.get(stack.metrics_url + "/metrics") as r:
        text = await r.text()
    assert KEY not in text and KEY not in orjson.dumps(stack.records).decode()
    assert 'key="k-' in text


async def test_absolute_uri_refused(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.running.proxy_port)
    writer.write(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    await writer.drain()
    head = await reader.read(100)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert stack.upstream.requests == []


async def test_metrics_port_serves_health_and_proxy_port_does_not(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with s.get(stack.metrics_url + path) as r:
                assert r.status == 200
        async with s.get(stack.proxy_url + "/healthz") as r:
            # Forwarded to the upstream like any other path (which has no script for it).
            assert r.status == 404
    assert stack.upstream.requests[-1]["path"] == "/healthz"


async def test_beside_a_gateway_a_disconnect_settles_at_the_gateways_bill(
        stack: Stack) -> None:
    """Default settings, an upstream that is not a provider API (a gateway such as one-api,
    which keeps reading the provider and bills the whole answer): the sidecar drains too, so
    the record equals the bill, and says which policy applied."""
    words = [sse({"model": "gpt-4o-mini", "choices": [
        {"index": 0, "delta": {"content": "word "}}]}, done=False)] * 60
    usage = sse({"model": "gpt-4o-mini", "choices": [], "usage": USAGE})
    sid = stack.upstream.add(Script(chunks=[*words, usage], delay=0.01))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(stack.proxy_url + "/v1/chat/completions", data=chat_body(),
                                  headers={"X-Script": sid})
        await resp.content.read(100)
        resp.close()
    await stack.wait_record()
    rec = stack.records[-1]
    assert rec["outcome"] == "client_disconnected" and rec["client_disconnect"] == "drain"
    assert rec["output_source"] == "reported" and rec["output_tokens"] == 97
    assert sid in stack.upstream.finished


def test_disconnect_policy_follows_the_placement() -> None:
    from sidecar.config import Route, Settings
    from sidecar.routing import targets

    settings = Settings(routes=(
        Route("/openai", "https://api.openai.com"), Route("/gw", "http://one-api:3000"),
        Route("/local", "http://ollama:11434"),
        Route("/pinned", "https://api.anthropic.com", client_disconnect="drain")))
    by_prefix = {t.prefix: t for t in targets(settings)}
    assert by_prefix["/openai"].disconnect_policy("openai") == "close"  # a provider: stop it
    assert by_prefix["/gw"].disconnect_policy("openai") == "drain"  # a gateway bills it all
    assert by_prefix["/local"].disconnect_policy("ollama") == "close"  # self-hosted
    assert by_prefix["/pinned"].disconnect_policy("anthropic") == "drain"
    assert by_prefix["/openai"].provider_known and not by_prefix["/gw"].provider_known


async def test_huge_chunk_is_counted_off_loop_and_passed_through(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reads a large read; tiktoken counts its large text in a worker thread."""
    counted_on: list[int] = []
    original = Meter.count_deferred

    def spy(self: Meter) -> None:
        if self.deferred:
            counted_on.append(threading.get_ident())
        original(self)

    monkeypatch.setattr(Meter, "count_deferred", spy)
    text = "lorem ipsum dolor sit amet " * 8000  # one 200+ KB frame
    body = chat_chunks(text, len(text))
    sid = stack.upstream.add(Script(chunks=[body]))
    status, _, got = await post(stack, sid, chat_body())
    assert status == 200 and got == body
    assert stack.records[-1]["output_tokens"] == _TOK.for_model("gpt-4o-mini").count(text)
    assert counted_on and threading.get_ident() not in counted_on


def test_learning_samples_each_kind_of_request_after_its_first(
        monkeypatch: pytest.MonkeyPatch, tokenizers: Tokenizers) -> None:
    """Every request of a kind teaches the calibration until LEARN_ALL of that kind were seen,
    then one in LEARN_EVERY; a kind first seen late (tools, after plain answers) still gets its
    first LEARN_ALL."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from sidecar import proxy as proxy_module
    from sidecar import structure
    from sidecar.app import make_app
    from sidecar.config import Settings

    learned: list[int] = []
    monkeypatch.setattr(structure, "learn_input", lambda cal, obs: learned.append(obs) or True)
    handler = make_app(Settings(upstream="http://127.0.0.1:9", state="memory://"),
                       registry=CollectorRegistry(), tokenizers=tokenizers,
                       record_sink=None).handler

    def meter(tools: int) -> Any:
        return SimpleNamespace(
            calls=0, prompt_tools=tools, prompt_thinking=False,
            reported=SimpleNamespace(reasoning=None), info=SimpleNamespace(body={}),
            observation=lambda model: None, input_observation=lambda model: tools + 1)

    n = proxy_module.LEARN_ALL + 3 * proxy_module.LEARN_EVERY
    for _ in range(n):
        handler._learn(meter(0), "gpt-4o")
    assert len(learned) == proxy_module.LEARN_ALL + 3
    learned.clear()
    for _ in range(proxy_module.LEARN_ALL):
        handler._learn(meter(5), "gpt-4o")
    assert learned == [6] * proxy_module.LEARN_ALL
    for _ in range(2 * proxy_module.LEARN_EVERY):  # an agent's requests, all day
        handler._learn(meter(5), "gpt-4o")
    assert len(learned) == proxy_module.LEARN_ALL + 2
