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
        assert native[:3] == general[:3]  # it may take more of the bytes: runs cut short
        fast = native
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
_OBFUSCATED = b',"obfuscation":"Qx7"'
_A_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
    b'"delta":{"type":"text_delta","text":'
_A_TAIL = b"}}\n\n"


def _lane_of(head: bytes, tail: bytes, vol: fastlane.Volatile | None,
             keys: tuple[str, ...] = ("content",)) -> fastlane.TemplateLane:
    lane = fastlane.TemplateLane(keys, vol)
    lane.learn(head + b'"x"' + tail, (0, "content"), "text", "x")
    assert [(t.head, t.tail) for t in lane._templates[None]] == [(head, tail)]
    return lane


_OPENAI = _lane_of(_HEAD, _TAIL, fastlane.volatile("obfuscation"))
_RESPONSES = _lane_of(_HEAD, _TAIL, fastlane.volatile("sequence_number", "obfuscation"))
_ANTHROPIC = _lane_of(_A_HEAD, _A_TAIL, fastlane.PADDING, ("text",))


def _native(lane: fastlane.TemplateLane, data: bytes) -> tuple[int, str]:
    if not fastlane.NATIVE:
        pytest.skip("the native core is not built in this install (no C compiler at install "
                    "time): the Python lane is what runs, and is what the tests above check")
    (t,) = lane._templates[None]
    assert fastlane._native_scan_run is not None
    return fastlane._native_scan_run(data, t.head, t.tail, lane._native_keys, lane._native_pad)


def _python(lane: fastlane.TemplateLane, data: bytes) -> tuple[list[int], list[str]]:
    """Event by event, what the Python lane's reading takes from the start of ``data``: the
    end of each event taken, and its text."""
    (t,) = lane._templates[None]
    ends: list[int] = []
    texts: list[str] = []
    pos = 0
    while (end := data.find(b"\n\n", pos) + 2) >= 2:
        ev = data[pos:end]
        if lane._vol is not None:
            ev = lane._vol.sub(lane._vol_with, ev)
        if len(ev) <= len(t.head) + len(t.tail) or not ev.startswith(t.head) \
                or not ev.endswith(t.tail):
            break
        try:
            text = orjson.loads(ev[len(t.head):len(ev) - len(t.tail)])
        except orjson.JSONDecodeError:
            break
        if type(text) is not str:
            break
        ends.append(end)
        texts.append(text)
        pos = end
    return ends, texts


def _run(*strings: bytes, head: bytes = _HEAD, tail: bytes = _TAIL) -> bytes:
    return b"".join(head + s + tail for s in strings)


_OBF_TAIL = _TAIL.replace(b"]}", b"]" + _OBFUSCATED + b"}")


@pytest.mark.parametrize(("lane", "data", "expected"), [
    (_OPENAI, _run(b'"Hello"', b'" world"', b'"!"'), "Hello world!"),
    (_OPENAI, _run(b'"a\\nb\\"c\\\\d\\/e\\tf\\bg\\fh\\ri"'), 'a\nb"c\\d/e\tf\bg\fh\ri'),
    (_OPENAI, _run(b'"\\u00e9\\u4E2D\\u0000"', b'"\xc3\xa9\xe4\xb8\xad"'),
     "\u00e9\u4e2d\x00\u00e9\u4e2d"),
    (_OPENAI, _run(b'""', b'""'), ""),
    (_OPENAI, _run(*[b'"' + b"x" * 500 + b'"'] * 20), "x" * 10_000),  # past the stack buffer
    # a run, then what it stops before
    (_OPENAI, _run(b'"a"', b'"b"') + b"data: [DONE]\n\n", "ab"),
    (_OPENAI, _run(b'"a"', b'"b"') + _HEAD + b'"c"', "ab"),  # a partial event
    (_OPENAI, _run(b'"a"', b'"\\ud83d\\ude00"', b'"b"'), "a"),  # escaped surrogates: Python's
    (_OPENAI, _run(b'"a"', b'"a\x01"'), "a"),  # a raw control character is not JSON
    (_OPENAI, _run(b'"a"', b'"a\\x"'), "a"),  # an unknown escape
    (_OPENAI, _run(b'"a"', b'"a\\u12"'), "a"),  # a short one
    (_OPENAI, _run(b'"a"', b"1"), "a"),  # not a string
    (_OPENAI, _run(b'"a"', b' "b"'), "a"),  # whitespace around it: Python's
    (_OPENAI, _run(b'"a"', b'"\xff"'), "a"),  # invalid UTF-8
    (_OPENAI, _run(b'"a"', b'"\xed\xa0\x80"'), "a"),  # an encoded surrogate
    (_OPENAI, _run(b'"\xe0\x80\x80"'), ""),  # an overlong form
    (_OPENAI, _run(b'"\xf4\x90\x80\x80"'), ""),  # above U+10FFFF
    # halves of a character in two events: invalid in each, though valid joined
    (_ANTHROPIC, _run(b'"a"', b'"\xc2"', b'"\x80"', head=_A_HEAD, tail=_A_TAIL), "a"),
    (_OPENAI, _run(b'"a"')[:-1], ""),
    (_OPENAI, b"", ""),
    # volatile pairs are left out, where the Python lane's pattern takes them
    (_OPENAI, _run(b'"a"', b'"b"', tail=_OBF_TAIL), "ab"),
    (_OPENAI, _run(b'"a"' + _OBFUSCATED, b'"b"'), "ab"),
    (_OPENAI, _run(b'"a"', tail=_TAIL.replace(b"]}", b'],"obfuscation":"\\u00e9"}')), ""),
    (_RESPONSES, _run(b'"a"', tail=_TAIL.replace(b"]}", b'],"sequence_number":12}')), "a"),
    (_RESPONSES, _run(b'"a"', tail=_TAIL.replace(b"]}", b'],"sequence_number":012}')), ""),
    (_RESPONSES, _run(b'"a"', tail=_TAIL.replace(b"]}", b'],"sequence_number":-3,'
                                                  b'"obfuscation":""}')), "a"),
    (_ANTHROPIC, _run(b'"a"', b'"b"', head=_A_HEAD, tail=b"}    }\n\n"), "ab"),
    (_ANTHROPIC, _run(b'"a"', head=_A_HEAD, tail=b"} }  \n\n"), ""),
])
def test_native_core_cases(lane: fastlane.TemplateLane, data: bytes, expected: str) -> None:
    end, text = _native(lane, data)
    assert text == expected
    ends, texts = _python(lane, data)
    taken = ends.index(end) + 1 if end else 0  # it ends where one of Python's events ends
    assert "".join(texts[:taken]) == text
    assert bool(end) == bool(expected) or text == ""


def _piece(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "ascii", "json.dumps", "binary", "raw"]))
    text = draw(st.text(max_size=8))
    if kind == "json":
        return orjson.dumps(text)  # what upstreams send
    if kind == "ascii":  # \\x, \\u and \\U escapes, valid or not
        return orjson.dumps(text).decode().encode("ascii", "backslashreplace")
    if kind == "json.dumps":  # \\u escapes, surrogate pairs included
        return json.dumps(text).encode()
    if kind == "binary":
        return b'"' + draw(st.binary(max_size=8)) + b'"'
    return draw(st.binary(max_size=12))


_VOLATILE_BITS = [b"", _OBFUSCATED, b',"obfuscation":""', b',"obfuscation":"\\u0041"',
                  b',"sequence_number":7', b',"sequence_number":-0', b',"sequence_number":1.5',
                  b",", b" "]


@st.composite
def _native_input(draw: st.DrawFn) -> tuple[fastlane.TemplateLane, bytes]:
    lane = draw(st.sampled_from([_OPENAI, _RESPONSES, _ANTHROPIC]))
    (t,) = lane._templates[None]
    events = []
    for _ in range(draw(st.integers(1, 8))):
        head, tail = t.head, t.tail
        if lane is _ANTHROPIC:
            tail = tail[:1] + b" " * draw(st.integers(0, 3)) + tail[1:]
        else:
            bit = draw(st.sampled_from(_VOLATILE_BITS))
            where = draw(st.integers(0, len(tail) - 2))
            tail = tail[:where] + bit + tail[where:]
        events.append(head + _piece(draw) + tail)
    junk = draw(st.sampled_from([b"", b"data: [DONE]\n\n", t.head + b'"par', b"\n", b"x"]))
    return lane, b"".join(events) + junk


@settings(max_examples=3000, deadline=None)
@given(case=_native_input())
def test_native_core_agrees_with_the_python_lane(
        case: tuple[fastlane.TemplateLane, bytes]) -> None:
    """On any run (valid, escaped, surrogate, malformed strings; volatile pairs and padding
    anywhere; a partial or other event after it) the native core takes a prefix of the events
    the Python lane takes, with the same texts; it stops short of them only before a case it
    leaves to Python (escaped surrogates, whitespace around a string)."""
    lane, data = case
    end, text = _native(lane, data)
    ends, texts = _python(lane, data)
    taken = ends.index(end) + 1 if end else 0
    assert "".join(texts[:taken]) == text
    if taken < len(ends):
        start = ends[taken - 1] if taken else 0
        event = data[start:ends[taken]]
        rare = re.search(rb"\\u[dD][89a-fA-F]", event) or re.search(rb'[:,]\s+"|"\s+[},]', event)
        assert rare, (data, end, ends)
