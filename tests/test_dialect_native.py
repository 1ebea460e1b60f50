"""Native formats without public captures (Zhipu v3, DashScope native) and non-stream bodies."""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.dialects import get_dialect
from sidecar.dialects.base import Usage
from sidecar.frames import Frame, SSEDecoder

from .test_dialect_openai import Recorder


def run_sse(dialect: str, body: bytes) -> Recorder:
    rec = Recorder()
    parser = get_dialect(dialect).stream_parser(rec)
    dec = SSEDecoder()
    for f in dec.feed(body) + dec.close():
        assert isinstance(f, Frame)
        parser.on_frame(f)
    return rec


def body(dialect: str, obj: Any) -> Recorder:
    rec = Recorder()
    get_dialect(dialect).parse_body(obj, rec)
    return rec


def test_zhipu_v3_add_finish_meta() -> None:
    # Shape from Zhipu's v3 SSE docs: raw text in data, usage in the finish event's meta field.
    stream = ("event: add\nid: 1\ndata: 你好\n\nevent: add\ndata: line one\ndata: line two\n\n"
              'event: finish\nid: 1\ndata: \nmeta: {"task_status":"SUCCESS","usage":'
              '{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}\n\n').encode()
    rec = run_sse("zhipu-v3", stream)
    assert [t[2] for t in rec.texts] == ["你好", "line one\nline two"]
    assert rec.usages == [Usage(input=12, output=8, total=20)] and rec.reasons == ["stop"]
    err = run_sse("zhipu-v3", b"event: error\ndata: quota exceeded\n\n")
    assert err.errors == ["quota exceeded"]


def test_dashscope_cumulative_text_counts_only_new_suffix() -> None:
    frames = [{"output": {"text": t, "finish_reason": "null"},
               "usage": {"input_tokens": 5, "output_tokens": n, "total_tokens": 5 + n},
               "request_id": "r"} for t, n in (("你", 1), ("你好", 2), ("你好，世界", 4))]
    stream = b"".join(b"id:%d\nevent:result\n:HTTP_STATUS/200\ndata:" % i + orjson.dumps(f)
                      + b"\n\n" for i, f in enumerate(frames))
    rec = run_sse("dashscope", stream)
    assert "".join(t[2] for t in rec.texts) == "你好，世界"
    assert rec.usages[-1] == Usage(input=5, output=4, total=9)


def test_dashscope_incremental_message_format() -> None:
    frames = [{"output": {"choices": [{"message": {"role": "assistant", "content": c,
                                                   "reasoning_content": r},
                                       "finish_reason": fr}]},
               "usage": {"input_tokens": 3, "output_tokens": 2,
                         "output_tokens_details": {"reasoning_tokens": 1}}}
              for c, r, fr in (("", "think", "null"), ("Hi", "", "null"), ("!", "", "stop"))]
    stream = b"".join(b"data:" + orjson.dumps(f) + b"\n\n" for f in frames)
    rec = run_sse("dashscope", stream)
    assert [(t[1], t[2]) for t in rec.texts] == [("reasoning", "think"), ("content", "Hi"),
                                                 ("content", "!")]
    assert rec.usages[-1].reasoning == 1 and rec.reasons == ["stop"]


def test_non_streamed_bodies() -> None:
    a = body("anthropic", {"model": "claude-x", "content": [
        {"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hi"},
        {"type": "tool_use", "name": "f", "input": {"a": 1}}], "stop_reason": "tool_use",
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 7, "output_tokens": 9}})
    assert a.usages == [Usage(input=112, output=9, cached_input=100, cache_write_input=7)]
    assert [t[1] for t in a.texts] == ["reasoning", "content", "tool"]
    g = body("gemini", {"candidates": [{"content": {"parts": [{"text": "x", "thought": True},
                                                              {"text": "y"}]}}],
                        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2,
                                          "thoughtsTokenCount": 3, "cachedContentTokenCount": 1}})
    assert g.usages == [Usage(input=4, output=5, cached_input=1, reasoning=3)]
    r = body("openai-responses", {"model": "gpt-5", "status": "completed", "output": [
        {"type": "reasoning", "summary": [{"text": "s"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "t"}]}],
        "usage": {"input_tokens": 3, "output_tokens": 4,
                  "output_tokens_details": {"reasoning_tokens": 2}}})
    assert r.usages == [Usage(input=3, output=4, reasoning=2)] and r.reasons == ["completed"]
    c = body("cohere", {"message": {"content": [{"type": "text", "text": "hey"}]},
                        "finish_reason": "COMPLETE", "usage": {"tokens": {
                            "input_tokens": 8, "output_tokens": 2}, "cached_tokens": 4}})
    assert c.usages == [Usage(input=8, output=2, cached_input=4)]
    b = body("bedrock", {"output": {"message": {"content": [{"text": "ok"}]}},
                         "stopReason": "end_turn", "usage": {
                             "inputTokens": 2, "outputTokens": 1, "totalTokens": 9,
                             "cacheReadInputTokens": 6}})
    assert b.usages == [Usage(input=8, output=1, cached_input=6, total=9)]
    e = body("ernie", {"result": "好", "is_end": True, "finish_reason": "normal",
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert e.usages == [Usage(input=1, output=1)] and e.texts[0][2] == "好"
    o = body("ollama", {"model": "m", "embeddings": [[0.1]], "prompt_eval_count": 4})
    assert o.usages == [Usage(input=4, output=0)]
    err = body("ernie", {"error_code": 18, "error_msg": "QPS limit"})
    assert err.errors == ["18: QPS limit"]


def test_openai_embeddings_and_reasoning_outside_completion() -> None:
    emb = body("openai", {"object": "list", "data": [{"object": "embedding"}],
                          "usage": {"prompt_tokens": 8, "total_tokens": 8}})
    assert emb.usages == [Usage(input=8, output=0, total=8)]
    xai = body("openai", {"choices": [], "usage": {
        "prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 303,
        "completion_tokens_details": {"reasoning_tokens": 290}}})
    assert xai.usages[0].output == 291
    ds = body("openai", {"usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                   "prompt_cache_hit_tokens": 6}})
    assert ds.usages[0].cached_input == 6


def test_request_parsing_per_dialect() -> None:
    g = get_dialect("gemini").parse_request(
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent", "", b"{}")
    assert (g.model, g.stream, g.json_stream) == ("gemini-2.5-pro", True, True)
    g = get_dialect("gemini").parse_request(
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent", "alt=sse", b"{}")
    assert not g.json_stream
    o = get_dialect("ollama").parse_request("/api/chat", "", b'{"model": "llama3"}')
    assert o.stream  # Ollama streams unless told not to
    e = get_dialect("ernie").parse_request(
        "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/completions_pro", "", b'{"stream": true}')
    assert (e.model, e.stream) == ("completions_pro", True)
    b = get_dialect("bedrock").parse_request(
        "/model/us.anthropic.claude-sonnet-4%3A0/converse-stream", "", b"{}")
    assert (b.model, b.stream) == ("us.anthropic.claude-sonnet-4:0", True)
    z = get_dialect("zhipu-v3").parse_request("/api/paas/v3/model-api/chatglm_turbo/sse-invoke",
                                              "", b'{"prompt": []}')
    assert (z.model, z.stream) == ("chatglm_turbo", True)
