"""The OpenAI dialect: what it reads from chunks, bodies and requests."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dialects.base import Usage
from sidecar.dialects.functions import estimate_legacy_chat
from sidecar.dialects.openai import OpenAIDialect, estimate_chat_prompt, rendered_tools, usage_from
from sidecar.frames import Frame
from sidecar.tokens import Tokenizers

from .conftest import conformance_dir


class Recorder:
    def __init__(self) -> None:
        self.texts: list[tuple[tuple[Any, ...], str, str]] = []
        self.usages: list[Usage] = []
        self.models: list[str] = []
        self.reasons: list[str] = []
        self.errors: list[str] = []
        self.bad: list[str] = []

    def text(self, slot: tuple[Any, ...], kind: str, text: str) -> None:
        self.texts.append((slot, kind, text))

    def usage(self, usage: Usage) -> None:
        self.usages.append(usage)

    def model(self, name: str) -> None:
        self.models.append(name)

    def finish_reason(self, reason: str) -> None:
        self.reasons.append(reason)

    def error(self, message: str) -> None:
        self.errors.append(message)

    def malformed(self, reason: str) -> None:
        self.bad.append(reason)


def feed(*objs: Any) -> Recorder:
    rec = Recorder()
    parser = OpenAIDialect().stream_parser(rec)
    for o in objs:
        parser.on_frame(Frame(data=o if isinstance(o, bytes) else orjson.dumps(o)))
    return rec


def test_content_refusal_reasoning_and_tools_are_separate_slots() -> None:
    rec = feed(
        {"model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]},
        {"choices": [{"index": 0, "delta": {"refusal": "no"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "c", "function": {"name": "get", "arguments": "{\"a\""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "function": {"arguments": ":1}"}}]}}]},
    )
    assert rec.texts == [((0, "content"), "content", "Hi"),
                         ((0, "reasoning"), "reasoning", "think"),
                         ((0, "refusal"), "content", "no"),
                         ((0, "tool", 1, "name"), "tool", "get"),
                         ((0, "tool", 1), "tool", "{\"a\""),
                         ((0, "tool", 1), "tool", ":1}")]
    assert rec.models == ["m"]


def test_several_choices_and_legacy_text() -> None:
    rec = feed({"choices": [{"index": 2, "delta": {"content": "b"}},
                            {"index": 0, "text": "a", "finish_reason": "length"}]})
    assert ((2, "content"), "content", "b") in rec.texts
    assert ((0, "content"), "content", "a") in rec.texts
    assert rec.reasons == ["length"]


def test_usage_chunk_with_details() -> None:
    rec = feed({"choices": [], "usage": {
        "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 7}}})
    assert rec.usages == [Usage(input=10, output=20, cached_input=4, reasoning=7, total=30)]


def test_done_null_usage_bad_json_and_errors() -> None:
    rec = feed(b"[DONE]", {"choices": [], "usage": None}, b"{oops", b"[1,2]",
               {"error": {"message": "overloaded"}})
    assert rec.usages == [] and rec.texts == []
    assert len(rec.bad) == 2 and rec.errors == ["overloaded"]


def test_usage_from_ignores_non_numbers() -> None:
    assert usage_from({"prompt_tokens": "12", "completion_tokens": True}) is None
    assert usage_from({"prompt_tokens": 3.0}) == Usage(input=3)


def test_non_streaming_body() -> None:
    rec = Recorder()
    OpenAIDialect().parse_body({"model": "x", "choices": [{"index": 0, "message": {
        "content": "hello", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
        rec)
    assert [t[2] for t in rec.texts] == ["hello", "f", "{}"]
    assert rec.usages == [Usage(input=1, output=2)] and rec.reasons == ["tool_calls"]


def test_parse_request() -> None:
    d = OpenAIDialect()
    info = d.parse_request("/v1/chat/completions", "", b'{"model": "gpt-4o", "stream": true}')
    assert (info.model, info.stream) == ("gpt-4o", True)
    assert d.parse_request("/", "", b"not json").model is None
    assert d.parse_request("/", "", b"[1]").body is None
    azure = d.parse_request("/openai/deployments/my-gpt4o/chat/completions",
                            "api-version=2024-06-01", b'{"messages": []}')
    assert azure.model == "my-gpt4o"
    assert d.parse_request("/v1/embeddings", "", b'{"input": "x"}').embeddings


def _cookbook_chat_cases() -> list[Any]:
    base = conformance_dir()
    if base is None:
        return [pytest.param(None, None, None, marks=pytest.mark.skip(
            reason="conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR"))]
    data = orjson.loads((base / "prompt-tokens" / "openai-cookbook.json").read_bytes())
    out = []
    for rev in data["revisions"]:
        for case in rev["cases"]:
            for res in case["results"]:
                # The older revision's bare "gpt-3.5-turbo" resolved to 0301 at run time.
                model = res["model"]
                if model == "gpt-3.5-turbo" and rev["commit"].startswith("06d9feb"):
                    model = "gpt-3.5-turbo-0301"
                out.append(pytest.param(case["request"], model, res["api_prompt_tokens"],
                                        id=f"{case['id']}-{res['model']}-{rev['commit'][:7]}"))
    return out


@pytest.mark.parametrize("request_body, model, api_tokens", _cookbook_chat_cases())
def test_prompt_formula_matches_published_api_counts(tokenizers: Tokenizers, request_body: Any,
                                                     model: str, api_tokens: int) -> None:
    """Every published count of the Cookbook, tool definitions included (rendered as OpenAI's
    TypeScript namespace)."""
    tok = tokenizers.for_model(model)
    assert estimate_chat_prompt(request_body["messages"], model, tok) + rendered_tools(
        request_body["messages"], request_body.get("tools") or [], tok) == api_tokens


@pytest.mark.parametrize("prompt, expect", [("hello world", 2), (["hello", "world"], 2),
                                            ([1, 2, 3], 3), ([[1, 2], [3]], 3)])
def test_legacy_prompt(tokenizers: Tokenizers, prompt: Any, expect: int) -> None:
    d = OpenAIDialect()
    info = d.parse_request("/v1/completions", "", orjson.dumps({"model": "gpt-3.5-turbo-instruct",
                                                            "prompt": prompt}))
    assert d.estimate_prompt(info, tokenizers.for_model(info.model)) == expect


def test_negative_or_odd_counts_are_ignored() -> None:
    assert usage_from({"prompt_tokens": -5, "completion_tokens": 7}) == Usage(output=7)
    assert usage_from({"prompt_tokens": 1e20, "completion_tokens": 2.5}) == Usage(input=10**20)


_ROLES = st.sampled_from(["system", "user", "assistant", "function", "tool", None])
_CONTENT = st.one_of(st.none(), st.just(""), st.text(max_size=40),
                     st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                     "text": st.text(max_size=10)}), max_size=2))
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": _ROLES, "content": _CONTENT},
                          optional={"name": st.text(max_size=8), "function_call": st.just(
                              {"name": "f", "arguments": "{}"})}),
    st.integers())  # not a message: skipped by both


@given(messages=st.lists(_MESSAGE, max_size=6), n_functions=st.integers(1, 3))
@settings(max_examples=300, deadline=None)
def test_rendered_tools_counts_only_what_the_functions_change(messages: list[Any],
                                                              n_functions: int) -> None:
    """rendered_tools() is the legacy estimate with the functions minus the one without them,
    worked out from the system message alone instead of counting every message twice."""
    tok = Tokenizers().for_model("gpt-4o")
    functions = [{"name": f"f{i}", "description": "Looks things up.", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "description": "query"}}}}
        for i in range(n_functions)]
    plain = [m for m in messages if isinstance(m, dict)]
    expected = estimate_legacy_chat(plain, functions, None, tok) - \
        estimate_legacy_chat(plain, None, None, tok)
    assert rendered_tools(messages, [{"type": "function", "function": f} for f in functions],
                          tok) == expected
