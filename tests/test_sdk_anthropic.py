"""The official anthropic SDK, pointed at the sidecar, sees the same events as directly."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic import AsyncAnthropic

import sidecar.proxy

from .conftest import Script, Stack


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **obj}) + b"\n\n"


STREAM = b"".join([
    _event("message_start", {"message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
    _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    _event("ping", {}),
    *[_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
      for w in ("Hello", " from", " the", " sidecar", " test", "。你好")],
    _event("content_block_stop", {"index": 0}),
    _event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": 12}}),
    _event("message_stop", {}),
])


async def _events(base_url: str, sid: str) -> list[Any]:
    client = AsyncAnthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0,
                            default_headers={"X-Script": sid})
    try:
        stream = await client.messages.create(
            model="claude-x", max_tokens=100, stream=True,
            messages=[{"role": "user", "content": "hi"}])
        return [e.model_dump() async for e in stream]
    finally:
        await client.close()


async def test_streaming_through_sidecar_equals_direct(stack: Stack) -> None:
    sid = stack.upstream.add(Script(chunks=[STREAM[:333], STREAM[333:]]))
    direct = await _events(stack.upstream.url, sid)
    proxied = await _events(stack.proxy_url, sid)
    assert proxied == direct and direct[-1]["type"] == "message_stop"
    rec = stack.records[-1]
    assert rec["provider"] == "anthropic" and rec["source"] == "reported"
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_input_tokens"]) == (
        125, 12, 100)
    assert stack.value("llm_tokens_total", token_type="cached_input", provider="anthropic") == 100


async def test_non_streaming_on_the_whole_answer_lane(stack: Stack,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole Messages answer, past the estimated sample: settled from its usage (cache reads
    included in input), the SDK's message unchanged."""
    monkeypatch.setattr(sidecar.proxy, "LEARN_ALL", 1)
    monkeypatch.setattr(sidecar.proxy, "LEARN_EVERY", 1000)
    body = orjson.dumps({
        "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Hello from the sidecar test。你好"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 0, "output_tokens": 12}})
    sid = stack.upstream.add(Script(chunks=[body], headers={"Content-Type": "application/json"}))

    async def message(base_url: str) -> Any:
        client = AsyncAnthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0,
                                default_headers={"X-Script": sid})
        try:
            got = await client.messages.create(
                model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
            return got.model_dump()
        finally:
            await client.close()

    direct = await message(stack.upstream.url)
    for _ in range(3):
        assert await message(stack.proxy_url) == direct
    assert [r["estimated_output_tokens"] is None for r in stack.records] == [False, True, True]
    assert all((r["input_tokens"], r["cached_input_tokens"], r["output_tokens"], r["source"])
               == (125, 100, 12, "reported") for r in stack.records)
    assert stack.value("llm_tokens_total", token_type="cached_input", source="reported") == 300
