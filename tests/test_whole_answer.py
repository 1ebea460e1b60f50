"""The whole-answer lane: a non-streamed answer whose usage the provider reports settles from the
report alone (the estimate runs on a sample), with the same settlement the Meter gives."""

from __future__ import annotations

import dataclasses
import gzip
import math
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sidecar.proxy
from sidecar.dialects import get_dialect
from sidecar.dialects.base import RequestInfo
from sidecar.meter import Meter, Report, Settlement
from sidecar.tokens import Tokenizers

from .conftest import Script, Stack, StackFactory, chat_chunks
from .test_proxy import USAGE, chat_body, post

_TOK = Tokenizers()
_ESTIMATES = ("estimated_input_tokens", "estimated_output_tokens", "first_token_at")

# -- the reader, against the Meter ------------------------------------------------------------

_text = st.text(min_size=0, max_size=40)
_count = st.one_of(st.integers(0, 5000), st.integers(0, 9), st.none())  # mostly reported


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@st.composite
def _openai(draw: Any) -> tuple[str, str, Any]:
    if draw(st.booleans()) and draw(st.booleans()):  # embeddings
        usage = _drop_none({"prompt_tokens": draw(_count), "total_tokens": draw(_count)})
        return "openai", "/v1/embeddings", {"object": "list", "data": [{"embedding": [0.1]}],
                                            "usage": usage}
    choices = []
    for i in range(draw(st.integers(0, 3))):
        msg = _drop_none({"content": draw(st.one_of(st.none(), _text)),
                          "reasoning_content": draw(st.one_of(st.none(), _text))})
        if draw(st.booleans()):
            msg["tool_calls"] = [{"index": 0, "function": {"name": draw(_text),
                                                           "arguments": draw(_text)}}]
        choices.append({"index": i, "message": msg, "finish_reason": draw(
            st.sampled_from(["stop", "length", "tool_calls"]))})
    obj: dict[str, Any] = {"model": draw(st.sampled_from(["gpt-4o-mini", "gpt-4.1"])),
                           "choices": choices}
    if draw(st.booleans()):
        usage = _drop_none({"prompt_tokens": draw(_count), "completion_tokens": draw(_count),
                            "total_tokens": draw(_count)})
        if draw(st.booleans()):
            usage["prompt_tokens_details"] = {"cached_tokens": draw(st.integers(0, 50))}
        if draw(st.booleans()):
            usage["completion_tokens_details"] = _drop_none(
                {"reasoning_tokens": draw(_count)})
        if draw(st.booleans()):
            usage["cost"] = 0.0012
        obj["usage"] = usage
    if draw(st.booleans()) and draw(st.booleans()):
        obj["error"] = {"message": draw(_text)}
    if draw(st.booleans()):
        obj["service_tier"] = "flex"
    return "openai", "/v1/chat/completions", obj


@st.composite
def _anthropic(draw: Any) -> tuple[str, str, Any]:
    content: list[Any] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["text", "thinking", "tool_use", "redacted_thinking"]))
        if kind == "text":
            content.append({"type": "text", "text": draw(_text)})
        elif kind == "thinking":
            content.append({"type": "thinking", "thinking": draw(_text)})
        elif kind == "tool_use":
            content.append({"type": "tool_use", "name": draw(_text), "input": {"a": 1}})
        else:
            content.append({"type": "redacted_thinking", "data": "xyz"})
    obj: dict[str, Any] = {"model": "claude-sonnet-4-5", "content": content,
                           "stop_reason": "end_turn"}
    if draw(st.booleans()):
        obj["usage"] = _drop_none({
            "input_tokens": draw(_count), "output_tokens": draw(_count),
            "cache_read_input_tokens": draw(_count),
            "cache_creation_input_tokens": draw(_count)})
    if draw(st.booleans()) and draw(st.booleans()):
        obj = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    return "anthropic", "/v1/messages", obj


@st.composite
def _gemini(draw: Any) -> tuple[str, str, Any]:
    parts = [_drop_none({"text": draw(_text), "thought": draw(st.one_of(st.none(),
                                                                       st.booleans()))})
             for _ in range(draw(st.integers(0, 3)))]
    obj: dict[str, Any] = {"candidates": [{"content": {"parts": parts},
                                           "finishReason": "STOP"}]}
    if draw(st.booleans()):
        obj["usageMetadata"] = _drop_none({
            "promptTokenCount": draw(_count), "candidatesTokenCount": draw(_count),
            "thoughtsTokenCount": draw(_count), "cachedContentTokenCount": draw(_count)})
    return "gemini", "/v1beta/models/gemini-2.5-flash:generateContent", obj


@st.composite
def _responses(draw: Any) -> tuple[str, str, Any]:
    output: list[Any] = []
    if draw(st.booleans()):
        output.append({"type": "reasoning", "summary": [{"text": draw(_text)}]})
    output.append({"type": "message", "content": [{"type": "output_text",
                                                   "text": draw(_text)}]})
    obj: dict[str, Any] = {"model": "gpt-5", "status": "completed", "output": output}
    if draw(st.booleans()):
        usage = _drop_none({"input_tokens": draw(_count), "output_tokens": draw(_count)})
        if draw(st.booleans()):
            usage["output_tokens_details"] = _drop_none({"reasoning_tokens": draw(_count)})
        obj["usage"] = usage
    return "openai-responses", "/v1/responses", obj


@st.composite
def _others(draw: Any) -> tuple[str, str, Any]:
    which = draw(st.sampled_from(["ernie", "ollama", "cohere", "bedrock"]))
    if which == "ernie":
        return which, "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/ernie-4.0-8k", {
            "result": draw(_text), "is_end": True,
            "usage": _drop_none({"prompt_tokens": draw(_count),
                                 "completion_tokens": draw(_count)})}
    if which == "ollama":
        return which, "/api/chat", _drop_none({
            "model": "llama3", "message": {"role": "assistant", "content": draw(_text)},
            "done": True, "prompt_eval_count": draw(_count), "eval_count": draw(_count)})
    if which == "cohere":
        return which, "/v2/chat", {
            "message": {"content": [{"type": "text", "text": draw(_text)}]},
            "finish_reason": "COMPLETE", "usage": {"tokens": _drop_none({
                "input_tokens": draw(_count), "output_tokens": draw(_count)})}}
    return which, "/model/amazon.nova-micro-v1:0/converse", {
        "output": {"message": {"content": [{"text": draw(_text)}]}}, "stopReason": "end_turn",
        "usage": _drop_none({"inputTokens": draw(_count), "outputTokens": draw(_count)})}


def _metered(dialect: str, info: RequestInfo, body: bytes, hidden: float) -> Settlement:
    meter = Meter(get_dialect(dialect), info, _TOK.for_model(info.model), lambda: 1.0)
    meter.hidden_expected = hidden
    meter.start_response("application/json", None)
    meter.feed(body)
    meter.end_of_body()
    return meter.settle()


def _without_estimates(s: Settlement) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    for k in _ESTIMATES:
        d.pop(k)
    return d


@given(case=st.one_of(_openai(), _anthropic(), _gemini(), _responses(), _others()),
       hidden=st.sampled_from([0.0, 0.0, 12.5]), garbage=st.integers(0, 30))
@settings(max_examples=400, deadline=None)
def test_report_settles_as_the_meter_does_or_declines(case: tuple[str, str, Any],
                                                      hidden: float, garbage: int) -> None:
    """Whenever the lane's reader settles a body, the settlement is the Meter's (estimates
    aside); when it declines, the Meter's settlement has something estimated or an error."""
    dialect, path, obj = case
    body = orjson.dumps(obj)
    if garbage == 1:
        body = body[: len(body) // 2]  # a truncated body: malformed for both
    info = get_dialect(dialect).parse_request(path, "", b'{"model": "gpt-4o-mini"}')
    report = Report(info.model)
    report.read(get_dialect(dialect), body)
    lane = report.settle(info.embeddings, hidden)
    general = _metered(dialect, info, body, hidden)
    if lane is not None:
        assert _without_estimates(lane) == _without_estimates(general)
        assert lane.estimated_input_tokens == lane.estimated_output_tokens == 0
    else:
        assert "estimated" in (general.input_source, general.output_source,
                               general.reasoning_source) \
            or general.error is not None or general.frame_errors, (obj, general)


def test_report_declines_what_must_be_estimated() -> None:
    d = get_dialect("openai")
    full = {"model": "m", "choices": [{"index": 0, "message": {"content": "Hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    r = Report("m")
    r.read(d, orjson.dumps(full))
    assert r.settle(False, 0.0) is not None
    assert r.settle(False, 5.0) is None  # learned hidden reasoning, unreported: estimated
    shown = {**full, "choices": [{"index": 0, "message": {"reasoning_content": "hmm"}}]}
    r = Report("m")
    r.read(d, orjson.dumps(shown))
    assert r.settle(False, 0.0) is None  # reasoning shown, not reported: estimated
    for broken in (b'{"choices": [', b"<html>502</html>"):
        r = Report("m")
        r.read(d, broken)
        assert r.settle(False, 0.0) is None and r.frame_errors == 1
    r = Report("m")
    r.read(d, orjson.dumps({"usage": {"prompt_tokens": 3}}))
    assert r.settle(False, 0.0) is None  # output not reported


# -- the proxy --------------------------------------------------------------------------------

ANSWER = {"id": "x", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there!"},
                       "finish_reason": "stop"}], "usage": USAGE}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def lane_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every whole answer on the lane (no warm-up sample, a sample of one in 1000)."""
    monkeypatch.setattr(sidecar.proxy, "LEARN_ALL", 0)
    monkeypatch.setattr(sidecar.proxy, "LEARN_EVERY", 1000)
    monkeypatch.setattr(sidecar.proxy, "ESTIMATE_EVERY_S", math.inf)


async def test_lane_settles_from_the_report(stack: Stack, lane_always: None) -> None:
    body = orjson.dumps(ANSWER)
    sid = stack.upstream.add(Script(chunks=[body[:7], body[7:]], headers=JSON))
    status, _, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == body
    rec = stack.records[-1]
    assert rec["source"] == "reported" and rec["stream"] is False
    assert (rec["input_tokens"], rec["output_tokens"], rec["cached_input_tokens"]) == (21, 97, 5)
    assert rec["estimated_input_tokens"] is None and rec["estimated_output_tokens"] is None
    assert rec["finish_reason"] == "stop" and rec["response_model"] == "gpt-4o-mini-2024-07-18"
    assert rec["cost_usd"] and rec["cost_usd"] > 0
    lbl = {"provider": "openai", "model": "gpt-4o-mini"}
    assert stack.value("llm_tokens_total", token_type="input", source="reported", **lbl) == 21
    assert stack.value("llm_tokens_total", token_type="output", source="reported", **lbl) == 97
    # Nothing was estimated: the live counters carry the reported counts.
    assert stack.value("llm_live_tokens_total", token_type="input", **lbl) == 21
    assert stack.value("llm_live_tokens_total", token_type="output", **lbl) == 97
    assert stack.value("llm_token_estimate_ratio_count") == 0
    assert stack.value("llm_requests_total", outcome="completed", stream="false") == 1
    assert stack.value("llm_cost_usd_total") == pytest.approx(rec["cost_usd"])


async def test_lane_samples_estimates(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first LEARN_ALL whole answers of a model are estimated, then one in LEARN_EVERY:
    the estimate ratio and the calibration keep learning."""
    monkeypatch.setattr(sidecar.proxy, "LEARN_ALL", 2)
    monkeypatch.setattr(sidecar.proxy, "LEARN_EVERY", 3)
    body = orjson.dumps(ANSWER)
    estimated = []
    for _ in range(7):
        sid = stack.upstream.add(Script(chunks=[body], headers=JSON))
        await post(stack, sid, chat_body(stream=False))
        estimated.append(stack.records[-1]["estimated_output_tokens"] is not None)
    assert estimated == [True, True, True, False, False, True, False]
    assert stack.value("llm_token_estimate_ratio_count", token_type="output") == 4
    assert all(r["output_tokens"] == 97 and r["source"] == "reported" for r in stack.records)


async def test_lane_samples_a_quiet_model_once_a_minute(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """However few its requests, a kind is estimated at least every ESTIMATE_EVERY_S."""
    monkeypatch.setattr(sidecar.proxy, "LEARN_ALL", 1)
    monkeypatch.setattr(sidecar.proxy, "LEARN_EVERY", 1000)
    now = [1000.0]  # the proxy's clock, moved by the test alone
    stack.apps.handler.clock = lambda: now[0]
    body = orjson.dumps(ANSWER)
    estimated = []
    for pause in (0, 1, sidecar.proxy.ESTIMATE_EVERY_S, 1):
        now[0] += pause
        sid = stack.upstream.add(Script(chunks=[body], headers=JSON))
        await post(stack, sid, chat_body(stream=False))
        estimated.append(stack.records[-1]["estimated_output_tokens"] is not None)
    assert estimated == [True, False, True, False]


async def test_lane_estimates_what_the_provider_did_not_report(
        stack: Stack, lane_always: None, tokenizers: Tokenizers) -> None:
    answer = {k: v for k, v in ANSWER.items() if k != "usage"}
    body = orjson.dumps(answer)
    sid = stack.upstream.add(Script(chunks=[body], headers=JSON))
    status, _, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == body
    rec = stack.records[-1]
    assert rec["source"] == "estimated" and rec["estimated_output_tokens"] == rec[
        "output_tokens"] > 0
    assert rec["estimated_input_tokens"] == rec["input_tokens"] > 0
    assert stack.value("llm_live_tokens_total", token_type="output") == rec["output_tokens"]
    assert stack.value("llm_live_tokens_total", token_type="input") == rec["input_tokens"]


async def test_lane_reads_compressed_answers(stack: Stack, lane_always: None) -> None:
    body = gzip.compress(orjson.dumps(ANSWER))
    sid = stack.upstream.add(Script(chunks=[body[:20], body[20:]], headers={
        **JSON, "Content-Encoding": "gzip"}))
    status, headers, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == body and headers["Content-Encoding"] == "gzip"
    rec = stack.records[-1]
    assert (rec["source"], rec["output_tokens"], rec["estimated_output_tokens"]) == (
        "reported", 97, None)
    broken = body[:30]  # a cut gzip stream: metered the general way, which says so
    sid = stack.upstream.add(Script(chunks=[broken], headers={
        **JSON, "Content-Encoding": "gzip"}))
    status, _, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == broken
    assert stack.records[-1]["source"] == "estimated"


async def test_lane_meters_a_stream_it_did_not_ask_for(stack: Stack, lane_always: None,
                                                       tokenizers: Tokenizers) -> None:
    text = "an answer that arrives as a stream although none was asked for"
    body = chat_chunks(text, 3)
    sid = stack.upstream.add(Script(chunks=[body]))
    status, _, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == body
    rec = stack.records[-1]
    assert rec["stream"] is True and rec["output_tokens"] == tokenizers.for_model(
        "gpt-4o-mini").count(text)
    assert stack.value("llm_streams_in_flight") == 0


async def test_lane_leaves_errors_and_failures_to_the_general_path(
        stack: Stack, lane_always: None) -> None:
    err = orjson.dumps({"error": {"message": "bad request", "type": "invalid_request_error"}})
    sid = stack.upstream.add(Script(chunks=[err], status=400, headers=JSON))
    status, _, got = await post(stack, sid, chat_body(stream=False))
    assert status == 400 and got == err
    rec = stack.records[-1]
    assert rec["outcome"] == "upstream_error" and rec["error"] == "bad request"
    assert (rec["input_tokens"], rec["output_tokens"]) == (0, 0)
    body = orjson.dumps(ANSWER)
    sid = stack.upstream.add(Script(chunks=[body[:40], body[40:]], headers=JSON,
                                    abort_after=1))
    with pytest.raises(aiohttp.ClientPayloadError):  # the client sees the same break
        await post(stack, sid, chat_body(stream=False))
    rec = await stack.wait_record()
    assert rec["outcome"] == "upstream_error" and rec["estimated_input_tokens"] is not None


async def test_lane_upstream_unreachable(stack_factory: StackFactory, lane_always: None) -> None:
    stack = await stack_factory(upstream="http://127.0.0.1:9")
    status, _, _ = await post(stack, "x", chat_body(stream=False))
    assert status == 502
    rec = stack.records[-1]
    assert rec["outcome"] == "upstream_error" and rec["input_tokens"] == 0
    # The prompt estimate still reached the live counter, as for any request sent.
    assert stack.value("llm_live_tokens_total", token_type="input") == rec[
        "estimated_input_tokens"] > 0


async def test_lane_hands_big_answers_to_the_meter(stack: Stack, lane_always: None) -> None:
    answer = {**ANSWER, "choices": [{"index": 0, "message": {"content": "word " * 300_000},
                                     "finish_reason": "stop"}]}
    body = orjson.dumps(answer)
    assert len(body) > sidecar.proxy.OFFLOAD_BYTES
    sid = stack.upstream.add(Script(chunks=[body[i:i + 65536]
                                            for i in range(0, len(body), 65536)], headers=JSON))
    status, _, got = await post(stack, sid, chat_body(stream=False))
    assert status == 200 and got == body
    rec = stack.records[-1]
    assert (rec["source"], rec["output_tokens"]) == ("reported", 97)
    # Metered the general way: "word " is one token, plus the answer's framing.
    assert 300_000 <= rec["estimated_output_tokens"] <= 300_010


async def test_estimate_all_turns_the_lane_off(stack_factory: StackFactory,
                                               lane_always: None) -> None:
    stack = await stack_factory(estimate_all=True)
    body = orjson.dumps(ANSWER)
    for _ in range(3):
        sid = stack.upstream.add(Script(chunks=[body], headers=JSON))
        await post(stack, sid, chat_body(stream=False))
    assert all(r["estimated_output_tokens"] is not None for r in stack.records)
    assert stack.value("llm_token_estimate_ratio_count", token_type="output") == 3


@given(cuts=st.lists(st.integers(0, 600), max_size=6))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_lane_and_meter_settle_the_same_over_the_wire(
        stack_factory: StackFactory, cuts: list[int]) -> None:
    """The same answer, through a sidecar that estimates everything and one on the lane:
    every settled series is equal; only the estimate ratio and live counts may differ."""
    body = orjson.dumps(ANSWER)
    chunks = [body[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(body)],
                                        strict=True) if body[a:b]]
    settled = []
    for estimate_all in (True, False):
        stack = await stack_factory(estimate_all=estimate_all)
        sidecar.proxy.LEARN_ALL, saved = 0, sidecar.proxy.LEARN_ALL
        try:
            sid = stack.upstream.add(Script(chunks=chunks, headers=JSON))
            status, _, got = await post(stack, sid, chat_body(stream=False))
        finally:
            sidecar.proxy.LEARN_ALL = saved
        assert status == 200 and got == body
        series = {}
        for family in stack.registry.collect():
            if family.name in ("llm_tokens", "llm_cost_usd", "llm_requests"):
                for s in family.samples:
                    if s.name.endswith("_total"):
                        series[(s.name, tuple(sorted(s.labels.items())))] = s.value
        rec = {k: v for k, v in stack.records[-1].items()
               if k not in ("request_id", "duration_seconds", "estimated_input_tokens",
                            "estimated_output_tokens")}
        settled.append((series, rec))
    assert settled[0] == settled[1]


async def test_lane_leaves_huge_prompts_to_a_worker(stack: Stack, lane_always: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A request body over OFFLOAD_BYTES is not taken by the lane: should its estimate be
    needed after all, it would be made on the loop. It is estimated in a worker as before."""
    monkeypatch.setattr(sidecar.proxy, "OFFLOAD_BYTES", 64 * 1024)
    prompt = chat_body(stream=False, messages=[{"role": "user", "content": "word " * 20_000}])
    assert len(prompt) > sidecar.proxy.OFFLOAD_BYTES
    body = orjson.dumps(ANSWER)
    sid = stack.upstream.add(Script(chunks=[body], headers=JSON))
    status, _, got = await post(stack, sid, prompt)
    assert status == 200 and got == body
    rec = stack.records[-1]
    assert rec["source"] == "reported" and rec["estimated_input_tokens"] > 20_000
