"""The sans-IO SSE / NDJSON decoders: each case whole, byte by byte, and at random splits."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.frames import (
    EventStreamDecoder,
    Frame,
    FrameError,
    JSONArrayDecoder,
    NDJSONDecoder,
    SSEDecoder,
    decoder_for,
)


def decode(data: bytes, sizes: list[int] | None = None, cls: type = SSEDecoder,
           **kw: int) -> list[object]:
    dec = cls(**kw)
    out: list[object] = []
    if sizes is None:
        out += dec.feed(data)
    else:
        pos = 0
        i = 0
        while pos < len(data):
            n = max(1, sizes[i % len(sizes)]) if sizes else 1
            out += dec.feed(data[pos:pos + n])
            pos += n
            i += 1
    out += dec.close()
    return out


def all_ways(data: bytes, **kw: int) -> list[object]:
    """Decode whole and one byte at a time; both must agree."""
    whole = decode(data, **kw)
    assert decode(data, [1], **kw) == whole
    return whole


def test_basic_events_and_fields() -> None:
    data = b"event: add\nid: 7\nretry: 1500\ndata: hello\n\n: a comment\ndata: bye\n\n"
    assert all_ways(data) == [
        Frame(data=b"hello", event="add", id="7", retry=1500),
        Frame(data=b"bye"),
    ]


def test_line_endings_lf_cr_crlf_are_equivalent() -> None:
    expect = [Frame(data=b"a\nb", event="x"), Frame(data=b"c")]
    for nl in (b"\n", b"\r", b"\r\n"):
        body = nl.join([b"event: x", b"data: a", b"data: b", b"", b"data: c", b"", b""])
        assert all_ways(body) == expect, nl


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    dec = SSEDecoder()
    out = dec.feed(b"data: a\r") + dec.feed(b"\n\r") + dec.feed(b"\ndata: b\r\n\r\n")
    assert out == [Frame(data=b"a"), Frame(data=b"b")]


def test_cr_at_end_dispatches_without_waiting_for_more() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: now\r\r") == [Frame(data=b"now")]


def test_leading_bom_stripped_even_when_split() -> None:
    data = b"\xef\xbb\xbfdata: x\n\n"
    assert all_ways(data) == [Frame(data=b"x")]
    dec = SSEDecoder()
    assert dec.feed(b"\xef") + dec.feed(b"\xbb") + dec.feed(b"\xbfdata: y\n\n") == [
        Frame(data=b"y")]


def test_value_space_rules() -> None:
    # One leading space is removed, no more; a line without a colon is a field with empty value.
    assert all_ways(b"data:  two\ndata\ndata:x\n\n") == [Frame(data=b" two\n\nx")]


def test_nonstandard_fields_kept_for_dialects() -> None:
    data = b'event: finish\ndata: done\nmeta: {"usage": {"total_tokens": 9}}\n\n'
    assert all_ways(data) == [Frame(data=b"done", event="finish",
                                    fields={"meta": '{"usage": {"total_tokens": 9}}'})]


def test_utf8_split_mid_character_and_u2028_inside_line() -> None:
    text = "data: 你好\u2028世界 🙂\n\n".encode()
    assert all_ways(text) == [Frame(data="你好\u2028世界 🙂".encode())]


def test_unterminated_last_event_is_dispatched_at_close() -> None:
    assert all_ways(b"data: {\"a\":1}\n\ndata: [DONE]") == [
        Frame(data=b'{"a":1}'), Frame(data=b"[DONE]")]


def test_id_with_nul_ignored_and_bad_retry_ignored() -> None:
    assert all_ways(b"id: a\x00b\nretry: 1x\ndata: z\n\n") == [Frame(data=b"z")]


def test_frame_size_limit_reports_and_recovers() -> None:
    big = b"data: " + b"x" * 200 + b"\n\n"
    data = big + b"data: ok\n\n"
    out = decode(data, max_frame_size=100)
    assert out == [FrameError("frame exceeds the size limit"), Frame(data=b"ok")]
    out = decode(data, [7], max_frame_size=100)
    assert out == [FrameError("frame exceeds the size limit"), Frame(data=b"ok")]


def test_many_data_lines_over_limit() -> None:
    data = b"data: 0123456789\n" * 20 + b"\n" + b"data: ok\n\n"
    assert decode(data, max_frame_size=100) == [FrameError("frame exceeds the size limit"),
                                                Frame(data=b"ok")]


EVENT = st.builds(
    lambda ev, lines, extra: (ev, lines, extra),
    st.one_of(st.none(), st.sampled_from(["add", "finish", "message_start", "ping"])),
    st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                            blacklist_categories=("Cs",)), max_size=20),
             min_size=1, max_size=4),
    st.booleans(),
)


@given(events=st.lists(EVENT, min_size=1, max_size=8),
       nl=st.sampled_from(["\n", "\r", "\r\n"]),
       sizes=st.lists(st.integers(1, 17), min_size=1, max_size=8),
       bom=st.booleans())
@settings(max_examples=300, deadline=None)
def test_same_frames_whatever_the_split(events: list[tuple[str | None, list[str], bool]],
                                        nl: str, sizes: list[int], bom: bool) -> None:
    parts = []
    expect = []
    for ev, lines, extra in events:
        block = []
        if ev:
            block.append(f"event: {ev}")
        block += [f"data: {line}" for line in lines]
        fields = {}
        if extra:
            block.append("meta: m")
            fields = {"meta": "m"}
        parts.append(nl.join(block) + nl + nl)
        expect.append(Frame(data="\n".join(lines).encode(), event=ev, fields=fields))
    data = ("\ufeff" if bom else "").encode() + "".join(parts).encode()
    assert decode(data) == expect
    assert decode(data, sizes) == expect


@given(data=st.binary(max_size=300), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_any_bytes_never_raise_and_split_invariant(data: bytes, sizes: list[int]) -> None:
    assert decode(data, sizes, max_frame_size=64) == decode(data, max_frame_size=64)
    assert decode(data, sizes, NDJSONDecoder, max_frame_size=64) == decode(
        data, cls=NDJSONDecoder, max_frame_size=64)


def test_ndjson_lines_blank_lines_and_final_line_without_newline() -> None:
    data = b'{"a":1}\n\n{"b":2}\r\n{"c":3}'
    expect = [Frame(data=b'{"a":1}'), Frame(data=b'{"b":2}'), Frame(data=b'{"c":3}')]
    assert decode(data, cls=NDJSONDecoder) == expect
    assert decode(data, [1], cls=NDJSONDecoder) == expect


def test_ndjson_size_limit() -> None:
    data = b"x" * 50 + b"\n" + b'{"ok":1}\n'
    assert decode(data, [3], cls=NDJSONDecoder, max_frame_size=20) == [
        FrameError("frame exceeds the size limit"), Frame(data=b'{"ok":1}')]


def test_decoder_for_content_types() -> None:
    assert isinstance(decoder_for("text/event-stream; charset=utf-8"), SSEDecoder)
    assert isinstance(decoder_for("application/x-ndjson"), NDJSONDecoder)
    assert decoder_for("application/json") is None
    assert decoder_for(None) is None


def _eventstream_message(event: str, payload: bytes) -> bytes:
    import zlib

    def header(name: str, value: str) -> bytes:
        n, v = name.encode(), value.encode()
        return bytes([len(n)]) + n + b"\x07" + len(v).to_bytes(2, "big") + v

    headers = header(":event-type", event) + header(":message-type", "event")
    total = 12 + len(headers) + len(payload) + 4
    prelude = total.to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    prelude += zlib.crc32(prelude).to_bytes(4, "big")
    body = prelude + headers + payload
    return body + zlib.crc32(body).to_bytes(4, "big")


def test_json_array_stream_elements_whatever_the_split() -> None:
    data = b'[{"a": "x}]", "b": [1, {"c": 2}]}\r\n,\r\n{"d": "\\"}"}\n]'
    expect = [Frame(data=b'{"a": "x}]", "b": [1, {"c": 2}]}'), Frame(data=b'{"d": "\\"}"}')]
    assert decode(data, cls=JSONArrayDecoder) == expect
    assert decode(data, [1], cls=JSONArrayDecoder) == expect
    assert decode(data, [3, 5], cls=JSONArrayDecoder) == expect


def test_json_array_truncated_and_oversized() -> None:
    assert decode(b'[{"a": 1}, {"b":', cls=JSONArrayDecoder) == [
        Frame(data=b'{"a": 1}'), FrameError("stream ended inside a JSON element")]
    big = b'[{"x": "' + b"y" * 100 + b'"}, {"ok": 1}]'
    assert decode(big, [10], cls=JSONArrayDecoder, max_frame_size=50) == [
        FrameError("frame exceeds the size limit"), Frame(data=b'{"ok": 1}')]


def test_eventstream_messages_and_corruption() -> None:
    a = _eventstream_message("contentBlockDelta", b'{"delta":{"text":"hi"}}')
    b = _eventstream_message("metadata", b'{"usage":{"inputTokens":1}}')
    out = decode(a + b, [5], cls=EventStreamDecoder)
    assert [(f.event, f.data) for f in out if isinstance(f, Frame)] == [
        ("contentBlockDelta", b'{"delta":{"text":"hi"}}'),
        ("metadata", b'{"usage":{"inputTokens":1}}')]
    bad = a[:-1] + bytes([a[-1] ^ 1]) + b
    assert decode(bad, cls=EventStreamDecoder)[0] == FrameError(
        "event-stream message CRC mismatch")
    assert decode(a[:20], cls=EventStreamDecoder) == [
        FrameError("stream ended inside an event-stream message")]


@given(data=st.binary(max_size=200), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None)
def test_array_and_eventstream_never_raise(data: bytes, sizes: list[int]) -> None:
    for cls in (JSONArrayDecoder, EventStreamDecoder):
        assert decode(data, sizes, cls, max_frame_size=64) == decode(data, cls=cls,
                                                                     max_frame_size=64)


def test_decoder_for_stream_formats() -> None:
    assert isinstance(decoder_for("application/vnd.amazon.eventstream"), EventStreamDecoder)
    assert isinstance(decoder_for("application/json", json_stream=True), JSONArrayDecoder)


# -- the cases established parsers test ---------------------------------------------------------
# Written here from the WHATWG event-stream rules, covering the cases the test suites of the npm
# `eventsource-parser` package (rexxars/eventsource-parser, test/parse.test.ts, MIT) and the
# web-platform-tests' eventsource/ directory check. Each case names the peer test it mirrors.
# Deviations of this decoder, on purpose (it feeds a meter, not a browser):
#   D1 an event not ended by a blank line is dispatched at close() (real streams end with
#      `data: [DONE]` and no blank line; usage may sit in that last frame);
#   D2 a block with an event name or a non-standard field but no data is still dispatched, with
#      data None (Zhipu's `meta:` frames; dialects ignore frames without data);
#   D3 the event id is per event, not carried over to later events (accounting never uses it);
#   D4 an empty `event:` value is reported as no event name (None), the spec's default;
#   D5 invalid `retry` values are ignored silently (nothing reconnects here).

def _f(data: str | None, event: str | None = None, id_: str | None = None,
       retry: int | None = None, **fields: str) -> Frame:
    return Frame(None if data is None else data.encode(), event, id_, retry, dict(fields))


PEER_CASES: list[tuple[str, bytes, list[Frame]]] = [
    ("basic unnamed events stream", b"data: 0\n\ndata: 1\n\nevent: done\ndata: \xe2\x9c\x94\n\n",
     [_f("0"), _f("1"), _f("\u2714", "done")]),
    ("stream of multi-line data events",
     b"event: stock\ndata: YHOO\ndata: +2\ndata: 10\n\nevent: stock\ndata: GOOG\ndata: -8\n"
     b"data: 1881\n\n",
     [_f("YHOO\n+2\n10", "stock"), _f("GOOG\n-8\n1881", "stock")]),
    ("stream using carriage returns", b"data: dog\rdata: bark\r\rdata: cat\rdata: meow\r\r",
     [_f("dog\nbark"), _f("cat\nmeow")]),
    ("stream using line feeds", b"data: cow\ndata: moo\n\ndata: horse\ndata: neigh\n\n",
     [_f("cow\nmoo"), _f("horse\nneigh")]),
    ("stream using carriage returns and line feeds",
     b"data: sheep\r\ndata: bleat\r\n\r\ndata: pig\r\ndata: oink\r\n\r\n",
     [_f("sheep\nbleat"), _f("pig\noink")]),
    ("stream with varying odd uses of comments",
     b": hi\ndata: First\n\n:\n:no space\ndata: Second\n\n: \xe2\x99\xa5\ndata: Third\n\n",
     [_f("First"), _f("Second"), _f("Third")]),
    ("heartbeat comments between events", b": \xe2\x99\xa5\n\ndata: A\n\n: \xe2\x99\xa5\n\n",
     [_f("A")]),
    ("stream of multi-byte events", "data: 我現在都看實況不玩遊戲\n\n".encode(),
     [_f("我現在都看實況不玩遊戲")]),
    ("stream of leading bom, then byte-order marks mid-stream (a field named \\ufeffdata)",
     b"\xef\xbb\xbfdata: bomful 1\n\n\xef\xbb\xbfdata: bomful 2\n\ndata: bomless 3\n\n",
     [_f("bomful 1"), _f(None, **{"\ufeffdata": "bomful 2"}), _f("bomless 3")]),  # D2
    ("stream with oddly shaped data field: `data:` is an empty data line",
     b"data:\n\ndata\ndata\n\ndata:test\n\n", [_f(""), _f("\n"), _f("test")]),
    ("only one leading space is stripped from a value", b"data:  two\n\ndata:none\n\n",
     [_f(" two"), _f("none")]),
    ("stream with `id` field containing a NULL character",
     b"id: 123\nid: bad\x00id\ndata: hello\n\n", [_f("hello", id_="123")]),
    ("stream with partially incorrect retry fields",
     b"retry:1000\ndata: a\n\nretry:2000x\ndata:x\n\n",
     [_f("a", retry=1000), _f("x")]),  # D5
    ("stream with empty `event` field", b"event:\ndata: Hello 1\n\nevent: done\ndata: ok\n\n",
     [_f("Hello 1"), _f("ok", "done")]),  # D4
    ("a field name without a colon takes an empty value", b"event\ndata: x\n\n", [_f("x")]),
    ("no newline after the last message", b"data: 1\n\ndata: 2", [_f("1"), _f("2")]),  # D1
    ("an id-only block dispatches nothing", b"id: 42\n\ndata: after\n\n", [_f("after")]),  # D3
]


def test_peer_cases_whole_byte_by_byte_and_with_trailing_bytes() -> None:
    for name, data, expected in PEER_CASES:
        for label, got in (("whole", decode(data)), ("byte by byte", decode(data, [1]))):
            assert got == expected, (name, label, got)
        # Trailing bytes of a next event change nothing already dispatched.
        if data.endswith((b"\n\n", b"\r\r")):
            assert SSEDecoder().feed(data + b"data: unfinished") == expected, name


def test_chunk_ending_in_cr_then_lf_is_one_line_end() -> None:
    """eventsource-parser: "stream with cr separating chunks of same event" (issue 17)."""
    dec = SSEDecoder()
    out: list[object] = []
    for part in (b"data: A\r\n", b"data: B\r", b"\n", b"data: C\r\n", b"\n"):
        out += dec.feed(part)
    assert out == [_f("A\nB\nC")]
