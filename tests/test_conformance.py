"""Real recorded provider streams, served over loopback through the sidecar under random
re-chunking: settled `reported` tokens must equal each provider's own numbers.

Fixtures come from SIDECAR_CONFORMANCE_DIR (default ../shared/fixtures); never copied here.
Expected values follow the documented token semantics (README, "Token types"): `input` is all
input including cache reads and writes, `output` includes reasoning. Where a provider reports
these differently, the expectation below says how it is derived from the provider's raw usage.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from .conftest import Script, StackFactory, conformance_dir, split_at

BASE = conformance_dir()


def _manifest() -> list[dict[str, Any]]:
    if BASE is None:
        return []
    return list(orjson.loads((BASE / "streams" / "MANIFEST.json").read_bytes()))


def _path_for(entry: dict[str, Any]) -> str:
    """The request path a client would use for this capture's API."""
    api, model = entry["api"], str(entry.get("model") or "m").split(" ")[0]
    return {
        "openai.completions": "/v1/completions",
        "openai.responses": "/v1/responses",
        "azure-openai.responses": "/openai/v1/responses",
        "deepseek.responses": "/v1/responses",
        "azure-openai.chat.completions":
            "/openai/deployments/router/chat/completions?api-version=2025-01-01-preview",
        "anthropic.messages": "/v1/messages",
        "gemini.streamGenerateContent": f"/v1beta/models/{model}:streamGenerateContent?alt=sse",
        "vertex.streamGenerateContent": "/v1/projects/p/locations/global/publishers/google/"
                                        f"models/{model}:streamGenerateContent?alt=sse",
        "gemini.interactions": "/v1beta/interactions?alt=sse",
        "bedrock.converseStream": f"/model/{model}/converse-stream",
        "cohere.v2.chat": "/v2/chat",
        "ollama.generate": "/api/generate",
        "ollama.chat": "/api/chat",
        "baidu.qianfan.v1.chat": f"/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{model}",
    }.get(api, "/v1/chat/completions")


def _content_type(file: str) -> str:
    if file.endswith(".ndjson"):
        return "application/x-ndjson"
    if file.endswith(".eventstream"):
        return "application/vnd.amazon.eventstream"
    return "text/event-stream"


def expected(entry: dict[str, Any]) -> tuple[int, int]:
    """(input, output) in our semantics, from the provider's reported usage."""
    u = entry["reported_usage"]
    inp, out = u["prompt_or_input_tokens"], u["completion_or_output_tokens"]
    raw = u["raw"]
    api = entry["api"]
    if api == "anthropic.messages":
        # Anthropic's input_tokens exclude cache reads and writes; message_delta restates
        # cumulative counts and wins over message_start field by field.
        merged = {**raw["message_start"], **raw["message_delta"]}
        iterations = raw["message_delta"].get("iterations")
        if iterations:
            # Server-side compaction: the top level is the last iteration only; the bill (and
            # our settlement) is the sum of all of them.
            merged = {k: sum(it.get(k, 0) for it in iterations) for k in (
                "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens")}
            out = merged["output_tokens"]
        inp = (merged["input_tokens"] + merged.get("cache_read_input_tokens", 0)
               + merged.get("cache_creation_input_tokens", 0))
    elif api in ("gemini.streamGenerateContent", "vertex.streamGenerateContent",
                 "gemini.interactions"):
        out += u["reasoning_tokens"] or 0  # thoughts are counted outside candidates
    elif api == "xai.chat.completions":
        out += u["reasoning_tokens"]  # xAI: total = prompt + completion + reasoning
    return inp, out


CASES = [pytest.param(e, id=e["file"]) for e in _manifest() if e["reported_usage"]]
if not CASES:
    CASES = [pytest.param(None, marks=pytest.mark.skip(
        reason="conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR"))]


async def _replay_through(stack: Any, entry: dict[str, Any], body: bytes,
                          content_type: str, seed: int) -> bytes:
    rng = random.Random(seed)
    cuts = [rng.randrange(len(body) + 1) for _ in range(rng.randrange(1, 40))]
    sid = stack.upstream.add(Script(chunks=split_at(body, cuts),
                                    headers={"Content-Type": content_type}))
    assert BASE is not None
    request_body = b"{}"
    if entry.get("request_file"):
        request_body = (BASE / "streams" / entry["request_file"]).read_bytes()
    headers = {"X-Script": sid, "Content-Type": "application/json",
               "Authorization": "Bearer sk-conformance"}
    if entry["api"] == "anthropic.messages":
        headers["anthropic-version"] = "2023-06-01"
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
            URL(stack.proxy_url + _path_for(entry), encoded=True), data=request_body,
            headers=headers) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.parametrize("entry", CASES)
async def test_reported_usage_settles_exactly(stack_factory: StackFactory,
                                              entry: dict[str, Any]) -> None:
    stack = await stack_factory()
    assert BASE is not None
    body = (BASE / "streams" / entry["file"]).read_bytes()
    for seed in range(3):
        got = await _replay_through(stack, entry, body, _content_type(entry["file"]), seed)
        assert got == body
    inp, out = expected(entry)
    recs = stack.records
    assert len(recs) == 3
    for rec in recs:
        assert (rec["input_tokens"], rec["output_tokens"]) == (inp, out), rec
        assert rec["source"] == "reported" and rec["frame_errors"] == 0, rec
    assert stack.value("llm_tokens_total", token_type="input", source="reported") == 3 * inp
    assert stack.value("llm_tokens_total", token_type="output", source="reported") == 3 * out
    assert recs[0]["provider"] == entry["provider"] or entry["provider"] in (
        "azure-openai", "deepseek", "groq", "mistral", "openrouter", "xai", "perplexity",
        "alibaba-qwen", "zhipu")  # OpenAI-compatible: the label comes from the upstream host
    reasoning = entry["reported_usage"]["reasoning_tokens"]
    if reasoning:
        assert stack.value("llm_tokens_total", token_type="reasoning",
                           source="reported") == 3 * reasoning


def _gemini_sse_as_json_array(path: Path) -> bytes:
    """The same chunks as Gemini sends them without alt=sse: one streamed JSON array."""
    from sidecar.frames import Frame, SSEDecoder

    dec = SSEDecoder()
    frames = [f for f in dec.feed(path.read_bytes()) + dec.close() if isinstance(f, Frame)]
    return b"[" + b"\r\n,\r\n".join(f.data or b"" for f in frames) + b"]"


@pytest.mark.skipif(BASE is None, reason="conformance fixtures not found")
async def test_gemini_json_array_stream_settles_like_sse(stack_factory: StackFactory) -> None:
    assert BASE is not None
    entry = next(e for e in _manifest()
                 if e["file"] == "gemini/generateContent-gemini-2.5-pro-thinking.sse")
    body = _gemini_sse_as_json_array(BASE / "streams" / entry["file"])
    stack = await stack_factory()
    entry = {**entry, "api": "gemini.json-array"}
    sid = stack.upstream.add(Script(chunks=split_at(body, [100, 1000, 1001, 3000]),
                                    headers={"Content-Type": "application/json"}))
    async with aiohttp.ClientSession() as session, session.post(
            stack.proxy_url + "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
            data=b"{}", headers={"X-Script": sid}) as resp:
        assert await resp.read() == body
    rec = stack.records[-1]
    assert (rec["input_tokens"], rec["output_tokens"], rec["reasoning_tokens"]) == (
        34, 469 + 787, 787)
    assert rec["stream"] is True and rec["frame_errors"] == 0


NO_USAGE = [pytest.param(e, id=e["file"]) for e in _manifest() if not e["reported_usage"]]


@pytest.mark.parametrize("entry", NO_USAGE or [pytest.param(None, marks=pytest.mark.skip(
    reason="conformance fixtures not found"))])
async def test_streams_without_usage_settle_estimated(stack_factory: StackFactory,
                                                      entry: dict[str, Any]) -> None:
    stack = await stack_factory()
    assert BASE is not None
    body = (BASE / "streams" / entry["file"]).read_bytes()
    await _replay_through(stack, entry, body, _content_type(entry["file"]), 0)
    rec = stack.records[-1]
    assert rec["output_source"] == "estimated" and rec["frame_errors"] == 0
    if "error" not in entry["file"]:
        assert rec["output_tokens"] > 0
