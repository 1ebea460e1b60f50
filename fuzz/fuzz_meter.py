"""Coverage-guided fuzzer (atheris) for the frame decoders, every dialect, the meter and the
realtime session meter, and the fast lane's native core against its Python reading.

Any bytes in: the decoders may only return frames or FrameError, dialects may only report
through the sink, request bodies are estimated and learned from without raising, and the meters
must never raise (the realtime meter reads the input's lines as
WebSocket messages, alternately from the client and the server). Counting a read's texts after
the read (Meter.count_deferred, as the proxy does for large texts) must give what counting them
in feed() gives, live and settled. The native core (where built)
reads the input, and its NUL-separated parts as a run of one template's events (with and
without volatile pairs and padding): what it takes, the Python lane must take with the same
text. Whole bodies: where the whole-answer lane's Report settles one, a Meter settles it the
same (estimates aside). Run by hand for long sessions:
    .venv/bin/python fuzz/fuzz_meter.py -max_total_time=600 fuzz/corpus
The test suite runs it for a bounded number of inputs (tests/test_fuzz.py).
"""

from __future__ import annotations

import dataclasses
import sys

import atheris

with atheris.instrument_imports():
    from sidecar import meter as meter_module
    from sidecar import structure
    from sidecar.calibration import Calibration
    from sidecar.dialects import DIALECTS, fastlane
    from sidecar.dialects.base import RequestInfo
    from sidecar.frames import (
        EventStreamDecoder,
        Frame,
        FrameError,
        JSONArrayDecoder,
        NDJSONDecoder,
        SSEDecoder,
    )
    from sidecar.meter import Meter, Report
    from sidecar.realtime import GEMINI, OPENAI, RealtimeMeter
    from sidecar.tokens import Tokenizers

_TOK = Tokenizers()
# Texts this short count as large here (deferrable, budgeted), so that inputs of a few hundred
# bytes reach the deferred path; no meter in this target has a budget.
meter_module.LARGE_TEXT = 16
_TOKENIZERS = [_TOK.for_model("gpt-4o"), _TOK.for_model("ernie-4.0")]
_NAMES = sorted(DIALECTS)
_DECODERS = (SSEDecoder, NDJSONDecoder, JSONArrayDecoder, EventStreamDecoder)
_CONTENT_TYPES = ("text/event-stream", "application/x-ndjson", "application/json",
                  "application/vnd.amazon.eventstream")
_LANES = []
for _vol in (None, fastlane.volatile("sequence_number", "obfuscation"), fastlane.PADDING):
    _lane = fastlane.TemplateLane(("content",), _vol)
    _lane.learn(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n', (0, "content"), "text", "x")
    _LANES.append(_lane)


def check_native(payload: bytes) -> None:
    """What the native core takes, the Python lane's event-by-event reading takes too, with
    the same texts."""
    scan_run = fastlane._native_scan_run
    if scan_run is None:
        return
    for lane in _LANES:
        t = lane._templates[None][0]
        parts = payload.split(b"\0")[:16]
        for data in (payload, b"".join(t.head + p + t.tail for p in parts)):
            end, text = scan_run(data, t.head, t.tail, lane._native_keys, lane._native_pad)
            if not end:
                continue
            took, _, texts = lane._prefix(data[:end], t)
            if took != end or "".join(texts) != text:
                raise AssertionError(f"native core read {data[:end]!r} as {text!r}, "
                                     f"Python as {texts!r} ({took} bytes)")


def check_whole(dialect: object, tokenizer: object, payload: bytes, split: int) -> None:
    """The whole-answer lane: wherever Report settles a body, a Meter settles it the same
    (estimates aside); where it declines, the Meter estimated something or saw an error."""
    info = RequestInfo(model="fuzz", embeddings=split % 2 == 0)
    hidden = 0.0 if split % 3 else 7.5
    report = Report(info.model)
    report.read(dialect, payload)  # type: ignore[arg-type]
    lane = report.settle(info.embeddings, hidden)
    whole = Meter(dialect, info, tokenizer, lambda: 0.0)  # type: ignore[arg-type]
    whole.hidden_expected = hidden
    whole.start_response("application/json", None)
    for i in range(0, len(payload), split):
        whole.feed(payload[i:i + split])
    whole.end_of_body()
    general = whole.settle()
    if lane is None:
        if "estimated" not in (general.input_source, general.output_source,
                               general.reasoning_source) \
                and general.error is None and not general.frame_errors:
            raise AssertionError(f"the lane declined what the meter settled as {general}")
        return
    mine = dataclasses.replace(lane, estimated_input_tokens=general.estimated_input_tokens,
                               estimated_output_tokens=general.estimated_output_tokens,
                               first_token_at=general.first_token_at)
    if mine != general:
        raise AssertionError(f"the lane settled {lane}, the meter {general}")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    choice = fdp.ConsumeIntInRange(0, 3)
    split = fdp.ConsumeIntInRange(1, 64)
    dialect = DIALECTS[_NAMES[fdp.ConsumeIntInRange(0, len(_NAMES) - 1)]]
    tokenizer = _TOKENIZERS[fdp.ConsumeIntInRange(0, 1)]
    gzip_it = fdp.ConsumeBool()
    protocol = (OPENAI, GEMINI, None)[fdp.ConsumeIntInRange(0, 2)]
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    check_native(payload)

    dec = _DECODERS[choice](max_frame_size=4096)
    items = []
    for i in range(0, len(payload), split):
        items += dec.feed(payload[i:i + split])
    items += dec.close()
    for item in items:
        if not isinstance(item, Frame | FrameError):
            raise AssertionError(f"decoder produced {item!r}")

    info = RequestInfo(model="fuzz", stream=True, json_stream=choice == 2)
    meter = Meter(dialect, info, tokenizer, lambda: 0.0, max_frame_size=4096)
    meter.start_response(_CONTENT_TYPES[choice], "gzip" if gzip_it else None)
    for i in range(0, len(payload), split):
        meter.feed(payload[i:i + split])
        meter.take_live()
    meter.end_of_body()
    s = meter.settle()
    # The proxy's way with large reads: texts of 1,000+ characters counted after the read
    # (count_deferred); live totals and settlement equal to counting them in feed().
    big = split * 64
    pair = [Meter(dialect, info, tokenizer, lambda: 0.0, max_frame_size=4096) for _ in range(2)]
    pair[1].defer_chars = 1
    for m in pair:
        m.start_response(_CONTENT_TYPES[choice], "gzip" if gzip_it else None)
    for i in range(0, len(payload), big):
        for m in pair:
            m.feed(payload[i:i + big])
        pair[1].count_deferred()
        if pair[0].take_live() != pair[1].take_live():
            raise AssertionError("deferred counting moved the live count")
    for m in pair:
        m.end_of_body()
    if pair[0].settle() != pair[1].settle():
        raise AssertionError(f"deferred counting settled {pair[1].settle()}, "
                             f"in feed {pair[0].settle()}")
    check_whole(dialect, tokenizer, payload, split)
    counts = (s.input_tokens, s.output_tokens, s.estimated_input_tokens,
              s.estimated_output_tokens, s.cached_input_tokens or 0, s.reasoning_tokens or 0)
    if min(counts) < 0:
        raise AssertionError(f"negative count in {s}")
    # The request side and learning: any body, then what the response taught.
    req = dialect.parse_request("/x", "", payload[:4096])
    asked = Meter(dialect, req, tokenizer, lambda: 0.0)
    if asked.estimate_prompt() < 0:
        raise AssertionError("negative prompt estimate")
    body = req.body
    structure.tool_definitions(body)
    structure.server_tools(body)
    structure.thinking_requested(body)
    structure.effort_of(body)
    cal = Calibration()
    for obs in (meter.observation(), asked.input_observation()):
        if isinstance(obs, structure.Observation):
            structure.learn(cal, obs)
        elif obs is not None:
            structure.learn_input(cal, obs)

    rt = RealtimeMeter(protocol, None, _TOK.for_model)
    for i, line in enumerate(payload.split(b"\n")):
        (rt.client if i % 2 else rt.server)(line if i % 3 else line.decode("utf-8", "replace"))
        if min(rt.take_live()) < 0:
            raise AssertionError("negative live count")
    for st in rt.close():
        if min(st.input_tokens, st.output_tokens, st.input_audio_tokens or 0,
               st.output_audio_tokens or 0) < 0:
            raise AssertionError(f"negative count in {st}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
