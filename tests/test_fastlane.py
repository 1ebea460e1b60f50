"""The fast lane is an optimisation of the same meaning: with and without it, every stream gives
the same settlement, the same live counts after every read, and the same frame errors, however
the upstream's bytes are cut into reads (mid-line, mid-character, mid-escape)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dialects import fastlane, get_dialect
from sidecar.dialects.base import RequestInfo
from sidecar.meter import Meter
from sidecar.replay import sniff
from sidecar.tokens import Tokenizers

from .conftest import conformance_dir

BASE = conformance_dir()


def meter_run(tokenizers: Tokenizers, data: bytes, dialect: str, content_type: str,
              cuts: list[int], lane: bool, model: str | None = None) -> tuple[Any, ...]:
    m = Meter(get_dialect(dialect), RequestInfo(model=model, stream=True),
              tokenizers.for_model(model), lambda: 0.0, fast_lane=lane)
    m.start_response(content_type, None)
    lives = []
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        m.feed(data[prev:c])
        prev = c
        lives.append(m.take_live())
    m.end_of_body()
    lives.append(m.take_live())
    return asdict(m.settle()), lives, m.frame_errors, m.bytes_fast, m.bytes_metered


def assert_same(tokenizers: Tokenizers, data: bytes, dialect: str, content_type: str,
                cuts: list[int], model: str | None = None) -> float:
    """The general path, the lane in Python and the lane with its native core (where built)
    give the same accounting; returns the share of bytes the lane read."""
    general = meter_run(tokenizers, data, dialect, content_type, cuts, False, model)
    assert general[3] == 0
    was = fastlane.use_native(False)
    try:
        fast = meter_run(tokenizers, data, dialect, content_type, cuts, True, model)
    finally:
        fastlane.use_native(was)
    assert fast[:3] == general[:3]
    if fastlane.NATIVE:
        native = meter_run(tokenizers, data, dialect, content_type, cuts, True, model)
        assert native == fast
    return fast[3] / fast[4] if fast[4] else 0.0


def _captures() -> list[Path]:
    if BASE is None:
        return []
    return sorted(p for p in (BASE / "streams").rglob("*.sse"))


CAPTURES = [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in _captures()] or [
    pytest.param(None, marks=pytest.mark.skip(
        reason="conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR"))]


@pytest.mark.parametrize("path", CAPTURES)
def test_every_capture_is_read_the_same_under_random_rechunking(
        path: Path, tokenizers: Tokenizers) -> None:
    data = path.read_bytes()
    dialect, content_type = sniff(data, path.name)
    rng = random.Random(path.name)
    assert_same(tokenizers, data, dialect, content_type, [])
    for _ in range(25):
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(1, 40))]
        assert_same(tokenizers, data, dialect, content_type, cuts)
    # One byte at a time: every split there is (mid-character and mid-escape included).
    if len(data) < 40_000:
        assert_same(tokenizers, data, dialect, content_type, list(range(1, len(data))))


def test_the_lane_takes_the_text_of_real_streams(tokenizers: Tokenizers) -> None:
    """Not a lane that never runs: on text-heavy captures it reads most of the bytes."""
    if BASE is None:
        pytest.skip("conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR")
    for name in ("openai/chat-gpt-4.1-nano-usage.sse", "openai/chat-gpt-4o-mini-no-usage.sse",
                 "deepseek/chat-deepseek-reasoner-thinking-usage.sse",
                 "alibaba-qwen/compatible-qwen3-max-reasoning-usage.sse",
                 "zhipu/v4-glm-4.7-thinking-usage.sse",
                 "anthropic/messages-sonnet-4-thinking-usage.sse",
                 "openai/chat-gpt-4o-mini-n3-multichoice-usage.sse"):
        data = (BASE / "streams" / name).read_bytes()
        dialect, content_type = sniff(data, name)
        share = assert_same(tokenizers, data, dialect, content_type, [])
        assert share > 0.8, (name, share)


# -- synthetic streams: the shapes the lane learns, and everything that must break a run ------

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def _chunk(model: str, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": None}], **extra}


@st.composite
def openai_stream(draw: st.DrawFn) -> bytes:
    events: list[bytes] = []
    model = "gpt-4o-mini"
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(
            ["content"] * 8 + ["reasoning", "obfuscated", "model", "usage", "finish", "tool",
                               "raw", "dup", "comment", "crlf", "spaced", "bad_utf8", "escape",
                               "both", "not_a_string"]))
        text = draw(_TEXT)
        if kind == "content":
            obj: Any = _chunk(model, {"content": text})
        elif kind == "reasoning":
            obj = _chunk(model, {"content": None, "reasoning_content": text})
        elif kind == "obfuscated":
            obj = _chunk(model, {"content": text}, obfuscation=draw(st.text(
                st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=8)))
        elif kind == "model":
            model = draw(st.sampled_from(["gpt-4o-mini", "gpt-4o", "o3-mini"]))
            obj = _chunk(model, {"content": text})
        elif kind == "usage":
            obj = {"model": model, "choices": [], "usage": {
                "prompt_tokens": 3, "completion_tokens": draw(st.integers(0, 50))}}
        elif kind == "finish":
            obj = _chunk(model, {"content": text})
            obj["choices"][0]["finish_reason"] = "stop"
        elif kind == "tool":
            obj = _chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        elif kind == "both":
            obj = _chunk(model, {"content": text, "reasoning_content": draw(_TEXT)})
        elif kind == "not_a_string":  # the template's shape with a value that is no string
            obj = _chunk(model, {"content": draw(st.sampled_from([None, 5, [text], {"t": 1}]))})
        else:
            obj = None
        if obj is not None:
            events.append(b"data: " + orjson.dumps(obj) + b"\n\n")
            continue
        body = orjson.dumps(_chunk(model, {"content": text}))
        if kind == "raw":  # a template-shaped event whose string is not valid JSON
            events.append(body.replace(orjson.dumps(text), b'"\\x' + text.encode()[:3] + b'"')
                          .join([b"data: ", b"\n\n"]))
        elif kind == "dup":  # duplicate keys: the last one wins, in both paths
            events.append(b"data: " + body[:-1] + b',"choices":[]}\n\n')
        elif kind == "comment":
            events.append(b": keep-alive\n\n")
        elif kind == "crlf":
            events.append(b"data: " + body + b"\r\n\r\n")
        elif kind == "spaced":
            events.append(b"data: " + body.replace(b'"content":', b'"content": ') + b"\n\n")
        elif kind == "bad_utf8":
            events.append(b"data: " + body.replace(b'"content":"', b'"content":"\xff') + b"\n\n")
        elif kind == "escape":
            events.append(b"data: " + body.replace(b'"content":"', b'"content":"\\n\\u00e9\\"')
                          + b"\n\n")
    return b"".join(events) + draw(st.sampled_from([b"data: [DONE]\n\n", b"data: [DONE]", b""]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=openai_stream(), data=st.data())
def test_synthetic_openai_streams_are_read_the_same(stream: bytes, data: st.DataObject,
                                                    tokenizers: Tokenizers) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert_same(tokenizers, stream, "openai", "text/event-stream", cuts, "gpt-4o-mini")


@st.composite
def anthropic_stream(draw: st.DrawFn) -> bytes:
    events = [b'event: message_start\ndata: {"type":"message_start","message":{"model":'
              b'"claude-sonnet-4-5","usage":{"input_tokens":5,"output_tokens":1}}}\n\n']
    for _ in range(draw(st.integers(1, 30))):
        text = draw(_TEXT)
        kind = draw(st.sampled_from(["text_delta", "thinking_delta", "input_json_delta",
                                     "ping", "padded", "index"]))
        if kind == "ping":
            events.append(b'event: ping\ndata: {"type": "ping"}\n\n')
            continue
        field = {"text_delta": "text", "thinking_delta": "thinking",
                 "input_json_delta": "partial_json"}.get(kind, "text")
        delta = {"type": kind if kind in ("text_delta", "thinking_delta", "input_json_delta")
                 else "text_delta", field: text}
        obj = {"type": "content_block_delta", "index": draw(st.integers(0, 2)) if kind == "index"
               else 0, "delta": delta}
        body = orjson.dumps(obj)
        if kind == "padded":
            body = body[:-1] + b" " * draw(st.integers(0, 20)) + b"}"
        events.append(b"event: content_block_delta\ndata: " + body + b"\n\n")
    events.append(b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
                  b'"end_turn"},"usage":{"output_tokens":' + str(draw(st.integers(0, 99)))
                  .encode() + b"}}\n\n")
    return b"".join(events)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=anthropic_stream(), data=st.data())
def test_synthetic_anthropic_streams_are_read_the_same(stream: bytes, data: st.DataObject,
                                                       tokenizers: Tokenizers) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert_same(tokenizers, stream, "anthropic", "text/event-stream", cuts, "claude-sonnet-4-5")


def test_events_split_between_reads_are_read_by_the_lane(tokenizers: Tokenizers) -> None:
    """An upstream that outpaces the proxy: reads end anywhere, mostly inside an event. The
    start of the event is kept back and read whole with the next read (not by the general
    reader), and a frame of our own is never due while it is."""
    words = [" meter", " token", " stream", "s", " of", " the", " tokens"]
    stream = b"".join(b"data: " + orjson.dumps(_chunk("gpt-4o-mini", {"content": w}))
                      + b"\n\n" for w in words * 60) + b"data: [DONE]\n\n"
    cuts = list(range(997, len(stream), 997))  # 997: never on an event's end for long
    assert sum(stream[c - 2:c] == b"\n\n" for c in cuts) < len(cuts) / 10
    share = assert_same(tokenizers, stream, "openai", "text/event-stream", cuts, "gpt-4o-mini")
    assert share > 0.97, share
    m = Meter(get_dialect("openai"), RequestInfo(model="gpt-4o-mini", stream=True),
              tokenizers.for_model("gpt-4o-mini"), lambda: 0.0)
    m.start_response("text/event-stream", None)
    m.feed(stream[:997])
    assert not m.at_frame_boundary()  # part of an event has reached the client
    end = stream.index(b"\n\n", 997) + 2
    m.feed(stream[997:end])
    assert m.at_frame_boundary()


# -- the native core: the Python lane's answer or none, never another --------------------------

_HEAD = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":'
_TAIL = b'},"finish_reason":null}]}\n\n'


def _template() -> fastlane.Template:
    lane = fastlane.TemplateLane(("content",), None)
    lane.learn(_HEAD + b'"x"' + _TAIL, (0, "content"), "text", "x")
    (template,) = lane._templates[None]
    assert (template.head, template.tail) == (_HEAD, _TAIL)
    return template


def _native() -> Any:
    if not fastlane.NATIVE:
        pytest.skip("the native core is not built in this install (no C compiler at install "
                    "time): the Python lane is what runs, and is what the tests above check")
    from sidecar import _lane
    return _lane.join_run


def _run(*strings: bytes) -> bytes:
    return b"".join(_HEAD + s + _TAIL for s in strings)


@pytest.mark.parametrize(("region", "expected"), [
    (_run(b'"Hello"', b'" world"', b'"!"'), "Hello world!"),
    (_run(b'"a\\nb\\"c\\\\d\\/e\\tf\\bg\\fh\\ri"'), 'a\nb"c\\d/e\tf\bg\fh\ri'),
    (_run(b'"\\u00e9\\u4E2D\\u0000"', b'"\xc3\xa9\xe4\xb8\xad"'), "\u00e9\u4e2d\x00\u00e9\u4e2d"),
    (_run(b'""', b'""'), ""),
    (_run(*[b'"' + b"x" * 500 + b'"'] * 20), "x" * 10_000),  # past the stack buffer
    (_run(b'"\\ud83d\\ude00"'), None),  # escaped surrogates: the general path
    (_run(b'"a\x01"'), None),  # a raw control character is not JSON
    (_run(b'"\xff"'), None),  # nor is invalid UTF-8
    (_run(b'"\xed\xa0\x80"'), None),  # an encoded surrogate
    (_run(b'"a\\x"'), None),  # an unknown escape
    (_run(b'"a\\u12"'), None),  # a short one
    (_run(b'"a"', b'1'), None),  # not a string
    (_run(b' "a"'), None),  # JSON whitespace around it: the Python reading decides
    (_run(b'"a"') + _HEAD + b'"b"', None),  # a partial last event
    (_run(b'"a"')[:-1], None),
    (b"", None),
    (b"data: [DONE]\n\n", None),
])
def test_native_core_cases(region: bytes, expected: str | None) -> None:
    join_run = _native()
    assert join_run(region, _HEAD, _TAIL) == expected
    texts = fastlane.read_run(region, _template())
    if expected is not None:
        assert texts is not None and "".join(texts) == expected


_PIECE = st.one_of(
    st.builds(orjson.dumps, st.text(max_size=8)),  # what upstreams send
    st.builds(lambda t: orjson.dumps(t).decode().encode("ascii", "backslashreplace"),
              st.text(max_size=8)),  # \x, \u and \U escapes, valid or not
    st.builds(lambda t: json.dumps(t).encode(), st.text(max_size=8)),
    st.binary(max_size=8).map(lambda b: b'"' + b + b'"'),  # anything between quotes
    st.binary(max_size=12),
)


@settings(max_examples=2000, deadline=None)
@given(pieces=st.lists(_PIECE, min_size=1, max_size=8), junk=st.binary(max_size=3))
def test_native_core_agrees_with_the_python_lane(pieces: list[bytes], junk: bytes) -> None:
    """On any run (valid, escaped, surrogate, malformed strings; junk after it) the native core
    gives the concatenated texts of the Python lane's reading, or None where the Python lane
    must decide; it is None only where that reading fails or the input is rare (escaped
    surrogates, whitespace around a string)."""
    join_run = _native()
    template = _template()
    region = _run(*pieces) + junk
    got = join_run(region, _HEAD, _TAIL)
    texts = fastlane.read_run(region, template)
    if got is not None:
        assert texts is not None and "".join(texts) == got
    elif texts is not None:
        rare = any(p[:1] != b'"' or p[-1:] != b'"' for p in pieces) or \
            re.search(rb"\\u[dD][89a-fA-F]", region)
        assert rare, (region, texts)
