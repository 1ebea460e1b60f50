"""The official openai SDK, pointed at the sidecar, receives exactly what it gets directly."""

from __future__ import annotations

import orjson
import pytest
from openai import AsyncOpenAI

import sidecar.proxy

from .conftest import Script, Stack, chat_chunks

KEY = "sk-sdk-test-0000000000000000"
TEXT = "The SDK must not notice the sidecar: same chunks, same ids, same usage. 你好！ " * 3
USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}


async def _collect(base_url: str, sid: str, stream: bool) -> object:
    client = AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0,
                         default_headers={"X-Script": sid})
    try:
        kwargs = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        if stream:
            chunks = await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs)
            return [c.model_dump() async for c in chunks]
        answer = await client.chat.completions.create(**kwargs)
        return answer.model_dump()
    finally:
        await client.close()


async def test_streaming_through_sidecar_equals_direct(stack: Stack) -> None:
    sid = stack.upstream.add(Script(chunks=[chat_chunks(TEXT, 3, usage=USAGE)]))
    direct = await _collect(stack.upstream.url, sid, stream=True)
    proxied = await _collect(stack.proxy_url, sid, stream=True)
    assert proxied == direct
    assert isinstance(direct, list) and direct[-1]["usage"]["completion_tokens"] == 40
    assert stack.value("llm_tokens_total", token_type="output", source="reported") == 40
    # The SDK's request reached the upstream as sent.
    sent = orjson.loads(stack.upstream.requests[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}


async def test_non_streaming_through_sidecar_equals_direct(stack: Stack) -> None:
    body = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                         "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": TEXT}}],
                         "usage": USAGE})
    sid = stack.upstream.add(Script(chunks=[body], headers={"Content-Type": "application/json"}))
    direct = await _collect(stack.upstream.url, sid, stream=False)
    proxied = await _collect(stack.proxy_url, sid, stream=False)
    assert proxied == direct
    assert stack.value("llm_tokens_total", token_type="input", source="reported") == 12


async def test_non_streaming_on_the_whole_answer_lane(stack: Stack,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's non-streamed calls, past the estimated sample: settled from the report, the
    SDK's answer unchanged (its request says nothing of streaming: the lane reads that)."""
    monkeypatch.setattr(sidecar.proxy, "LEARN_ALL", 1)
    monkeypatch.setattr(sidecar.proxy, "LEARN_EVERY", 1000)
    body = orjson.dumps({"id": "chatcmpl-2", "object": "chat.completion", "created": 1,
                         "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
                         "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                      "message": {"role": "assistant", "content": TEXT,
                                                  "refusal": None, "annotations": []}}],
                         "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 0,
                                                                      "audio_tokens": 0},
                                   "completion_tokens_details": {"reasoning_tokens": 0}}})
    sid = stack.upstream.add(Script(chunks=[body], headers={"Content-Type": "application/json"}))
    direct = await _collect(stack.upstream.url, sid, stream=False)
    for _ in range(3):
        assert await _collect(stack.proxy_url, sid, stream=False) == direct
    assert [r["estimated_output_tokens"] is None for r in stack.records] == [False, True, True]
    assert all((r["input_tokens"], r["output_tokens"], r["source"]) == (12, 40, "reported")
               for r in stack.records)
    assert stack.value("llm_tokens_total", token_type="output", source="reported") == 120
    assert stack.value("llm_live_tokens_total", token_type="output") == pytest.approx(
        80 + stack.records[0]["estimated_output_tokens"])
