"""App lifecycle: routes to several upstreams, include_usage injection, learned state on disk."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from sidecar.app import make_app, start
from sidecar.config import Route, Settings
from sidecar.structure import SEEDS
from sidecar.tokens import SUPPORTED_ENCODINGS, Tokenizers, get_encoding

from .conftest import Script, ScriptedUpstream, StackFactory, chat_chunks, sse

USAGE = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}


async def test_routes_pick_upstream_strip_prefix_and_detect_dialect(
        stack_factory: StackFactory) -> None:
    first = await stack_factory()
    second = first.upstream  # the same scripted server stands in for two providers
    routes = (Route("/anthropic", second.url, provider="anthropic-direct"),
              Route("/ollama", second.url, dialect="ollama"))
    stack = await stack_factory(routes=routes)
    msg = sse({"type": "message_start", "message": {"model": "claude-x", "usage": {
        "input_tokens": 10, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                              "text": "hi"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 4}}, done=False)
    sid = second.add(Script(chunks=[msg]))
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.proxy_url + "/anthropic/v1/messages",
                          json={"model": "claude-x", "stream": True, "messages": []},
                          headers={"X-Script": sid, "anthropic-version": "2023-06-01"}) as r:
            assert await r.read() == msg
        assert second.requests[-1]["path"] == "/v1/messages"
        nd = b'{"model":"llama3","response":"yo","done":false}\n' \
             b'{"model":"llama3","response":"","done":true,"prompt_eval_count":3,"eval_count":2}\n'
        sid2 = second.add(Script(chunks=[nd], headers={"Content-Type": "application/x-ndjson"}))
        async with s.post(stack.proxy_url + "/ollama/api/generate",
                          json={"model": "llama3", "prompt": "hi"},
                          headers={"X-Script": sid2}) as r:
            assert await r.read() == nd
    a, o = stack.records[-2], stack.records[-1]
    assert (a["provider"], a["input_tokens"], a["output_tokens"]) == ("anthropic-direct", 10, 4)
    assert (o["provider"], o["input_tokens"], o["output_tokens"]) == ("ollama", 3, 2)
    # The catch-all --upstream route still serves other paths.
    sid3 = stack.upstream.add(Script(chunks=[chat_chunks("x", 1, usage=USAGE)]))
    async with aiohttp.ClientSession() as s, s.post(
            stack.proxy_url + "/v1/chat/completions", json={"model": "gpt-4o"},
            headers={"X-Script": sid3}) as r:
        await r.read()
    assert stack.records[-1]["provider"] == "openai"


async def test_no_route_is_404_and_nothing_is_forwarded(stack_factory: StackFactory) -> None:
    probe = await stack_factory()
    stack = await stack_factory(upstream="", routes=(Route("/only", probe.upstream.url),))
    async with aiohttp.ClientSession() as s, s.get(stack.proxy_url + "/elsewhere") as r:
        assert r.status == 404
    assert probe.upstream.requests == []


async def test_include_usage_is_injected_and_hidden_from_the_client(
        stack_factory: StackFactory) -> None:
    stack = await stack_factory(include_usage=True)
    with_usage = chat_chunks("hello world", 3, usage=USAGE)
    without = chat_chunks("hello world", 3)
    sid = stack.upstream.add(Script(chunks=[with_usage[:50], with_usage[50:]]))
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.proxy_url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "stream": True, "messages": []},
                          headers={"X-Script": sid}) as r:
            got = await r.read()
        assert got == without  # the usage chunk the client never asked for is gone
        sent = orjson.loads(stack.upstream.requests[-1]["body"])
        assert sent["stream_options"] == {"include_usage": True}
        # The filter reads what it hides: the stream is asked for with no Accept-Encoding.
        assert "Accept-Encoding" not in stack.upstream.requests[-1]["headers"]
        assert stack.records[-1]["source"] == "reported"
        # A client that asked for usage gets it, untouched.
        async with s.post(stack.proxy_url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "stream": True, "messages": [],
                                "stream_options": {"include_usage": True}},
                          headers={"X-Script": sid}) as r:
            assert await r.read() == with_usage


async def test_learned_factors_survive_restart(stack_factory: StackFactory,
                                               tmp_path: Path) -> None:
    state = f"sqlite:///{tmp_path}/state.db"
    text = "A reasonably long answer from a model whose tokenizer is not public. " * 6
    stack = await stack_factory(state=state)
    tok = stack.apps.handler.tokenizers.for_model("glm-4.7")
    raw = tok.weigh(text)
    # the tokenizer factor is learned on the text net of the answer's framing (structure.py)
    reported = round(raw * 1.3 + SEEDS["glm"].answer)
    body = chat_chunks(text, 7, model="glm-4.7", usage={
        "prompt_tokens": 30, "completion_tokens": reported, "total_tokens": 30 + reported})
    sid = stack.upstream.add(Script(chunks=[body]))
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.post(stack.proxy_url + "/v1/chat/completions",
                              json={"model": "glm-4.7", "stream": True},
                              headers={"X-Script": sid}) as r:
                await r.read()
    assert abs(stack.apps.handler.calibration.factor("glm-4.7", "output") - 1.3) < 0.02
    await stack.running.stop()  # flushes the state file

    again = await stack_factory(state=state)
    assert abs(again.apps.handler.calibration.factor("glm-4.7", "output") - 1.3) < 0.02
    bare = chat_chunks(text, 7, model="glm-4.7")
    sid = again.upstream.add(Script(chunks=[bare]))
    async with aiohttp.ClientSession() as s, s.post(
            again.proxy_url + "/v1/chat/completions", json={"model": "glm-4.7", "stream": True},
            headers={"X-Script": sid}) as r:
        await r.read()
    rec = again.records[-1]
    assert rec["output_source"] == "estimated"
    assert abs(rec["output_tokens"] - reported) <= 2  # the live estimate converged


async def test_counters_alerts_read_start_at_zero(stack_factory: StackFactory) -> None:
    """A rate() over a series that does not exist yet is "no data", not 0: the series the rules
    and dashboards read exist from the start, for every provider the configuration names."""
    from sidecar.budgets import Budget

    first = await stack_factory()
    routes = (Route("/anthropic", first.upstream.url, provider="anthropic"),
              Route("/gw", first.upstream.url))
    hard = Budget("hard", {}, "day", limit_tokens=10, action="block", cut_off_streams=True)
    stack = await stack_factory(routes=routes, budgets=(hard,))
    async with aiohttp.ClientSession() as s, s.get(stack.metrics_url + "/metrics") as r:
        text = await r.text()
    for provider in ("anthropic", "openai"):
        assert f'llm_frame_errors_total{{provider="{provider}"}} 0.0' in text
        assert f'llm_budget_rejections_total{{budget="hard",provider="{provider}"}} 0.0' in text
        assert f'llm_budget_cut_offs_total{{budget="hard",provider="{provider}"}} 0.0' in text
    assert "llm_tokenizer_estimated_chars_total 0.0" in text


class _FirstEncoder:
    """A tiktoken Encoding that remembers the thread of its first encode_ordinary call."""

    def __init__(self, enc: Any) -> None:
        self._enc = enc
        self.first_thread: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._enc, name)

    def encode_ordinary(self, text: str) -> list[int]:
        if self.first_thread is None:
            self.first_thread = threading.get_ident()
        result: list[int] = self._enc.encode_ordinary(text)
        return result


async def test_encodings_first_encode_on_the_loop_thread() -> None:
    """Loading runs in a worker, but the first encode (the one tiktoken's matcher gives its fast
    path to) happens on the event loop's thread, before any request can be metered in a worker."""
    loaded: dict[str, _FirstEncoder] = {}

    def loader(name: str) -> Any:
        loaded[name] = _FirstEncoder(get_encoding(name))
        return loaded[name]

    upstream = ScriptedUpstream()
    await upstream.start()
    settings = Settings(upstream=upstream.url, listen=("127.0.0.1", 0),
                        metrics_listen=("127.0.0.1", 0), state="memory://")
    apps = make_app(settings, tokenizers=Tokenizers(loader=loader), record_sink=None)
    running = await start(apps, settings, shutdown_timeout=1.0)
    try:
        assert sorted(loaded) == sorted(SUPPORTED_ENCODINGS)
        loop_thread = threading.get_ident()
        assert all(e.first_thread == loop_thread for e in loaded.values()), \
            {n: e.first_thread for n, e in loaded.items()}
    finally:
        await running.stop()
        await upstream.stop()
