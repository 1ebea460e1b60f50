"""The realtime session meter, sans-IO: OpenAI/Azure Realtime and Gemini Live message streams."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.attribution import bearer_key
from sidecar.calibration import Calibration
from sidecar.realtime import (
    GEMINI,
    OPENAI,
    RealtimeMeter,
    b64_size,
    bytes_per_second,
    detect,
    model_from_query,
    realtime_usage,
)
from sidecar.tokens import Tokenizers


@pytest.fixture
def meter_for(tokenizers: Tokenizers):  # type: ignore[no-untyped-def]
    def make(protocol: str | None = OPENAI, model: str | None = "gpt-realtime",
             calibration: Calibration | None = None) -> RealtimeMeter:
        return RealtimeMeter(protocol, model, tokenizers.for_model, calibration)
    return make


def ev(**fields: object) -> bytes:
    return orjson.dumps(fields)


def audio(seconds: float, bps: int = 48_000) -> str:
    return base64.b64encode(bytes(int(seconds * bps))).decode()


def usage(inp: int, out: int, in_audio: int = 0, out_audio: int = 0,
          cached: int = 0) -> dict[str, object]:
    return {"total_tokens": inp + out, "input_tokens": inp, "output_tokens": out,
            "input_token_details": {"text_tokens": inp - in_audio, "audio_tokens": in_audio,
                                    "cached_tokens": cached,
                                    "cached_tokens_details": {"text_tokens": cached,
                                                              "audio_tokens": 0}},
            "output_token_details": {"text_tokens": out - out_audio, "audio_tokens": out_audio}}


def response(m: RealtimeMeter, rid: str, text: str = "", audio_seconds: float = 0.0,
             done_usage: dict[str, object] | None = None, done: bool = True) -> None:
    m.server(ev(type="response.created", response={"id": rid, "status": "in_progress"}))
    for word in text.split(" ") if text else ():
        m.server(ev(type="response.output_audio_transcript.delta", response_id=rid,
                    item_id="it", content_index=0, delta=word + " "))
    if audio_seconds:
        for _ in range(4):
            m.server(ev(type="response.output_audio.delta", response_id=rid, item_id="it",
                        content_index=0, delta=audio(audio_seconds / 4)))
    if done:
        m.server(ev(type="response.done", response={"id": rid, "status": "completed",
                                                    "usage": done_usage}))


def test_paths_formats_and_sizes() -> None:
    assert detect("/v1/realtime") == OPENAI
    assert detect("/openai/realtime/") == OPENAI
    assert detect("/ws/google.ai.generativelanguage.v1beta.GenerativeService."
                  "BidiGenerateContent") == GEMINI
    assert detect("/v1/chat/completions") is None
    assert model_from_query("model=gpt-realtime&x=1") == "gpt-realtime"
    assert model_from_query("api-version=2025-04-01-preview&deployment=my-rt") == "my-rt"
    assert bytes_per_second("pcm16", 0) == 48_000
    assert bytes_per_second("g711_ulaw", 0) == bytes_per_second({"type": "audio/pcma"}, 0) \
        == 8_000
    assert bytes_per_second({"type": "audio/pcm", "rate": 24000}, 0) == 48_000
    assert bytes_per_second("audio/pcm;rate=16000", 0) == 32_000
    assert bytes_per_second("opus", 123) == 123
    for n in range(0, 40):
        assert b64_size(base64.b64encode(bytes(n)).decode()) == n
        assert b64_size(base64.b64encode(bytes(n))) == n


def test_key_in_a_websocket_subprotocol() -> None:
    h = {"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-abc123, "
                                   "openai-beta.realtime-v1"}
    assert bearer_key(h) == "sk-abc123"
    assert bearer_key({**h, "Authorization": "Bearer sk-header"}) == "sk-header"
    assert bearer_key({"Sec-WebSocket-Protocol": "realtime"}) is None


def test_each_response_done_settles_its_usage_and_live_counts_follow(
        meter_for, tokenizers: Tokenizers) -> None:  # type: ignore[no-untyped-def]
    m = meter_for()
    said = tokenizers.for_model("gpt-realtime").count("Hello there, how can I help? ")
    m.server(ev(type="session.created", session={"model": "gpt-realtime", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 24000}},
        "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}))
    m.client(ev(type="session.update", session={"instructions": "Be brief and kind."}))
    m.client(ev(type="input_audio_buffer.append", audio=audio(2.0)))
    _, i_audio, _, _ = m.take_live()
    assert i_audio == 20  # 2 s of user audio at 10 tokens per second
    response(m, "r1", "Hello there, how can I help?", 3.0, usage(40, 70, 20, 62))
    r1 = m.take_settled()
    assert len(r1) == 1
    s = r1[0]
    assert (s.input_tokens, s.output_tokens, s.input_audio_tokens, s.output_audio_tokens) \
        == (40, 70, 20, 62)
    assert s.input_source == s.output_source == "reported"
    assert s.estimated_output_tokens == 60 + said  # 3 s at 20/s, and the transcript
    live = m.take_live()
    assert live[1] == 0 and live[3] == 60 and live[2] == said
    # A second response: its input is the whole conversation, reported again.
    m.client(ev(type="conversation.item.create", item={
        "type": "message", "role": "user", "content": [{"type": "input_text",
                                                        "text": "And the weather?"}]}))
    response(m, "r2", "Sunny.", 1.0, usage(130, 28, 82, 20, cached=64))
    (s2,) = m.take_settled()
    assert (s2.input_tokens, s2.cached_input_tokens, s2.output_audio_tokens) == (130, 64, 20)
    # The estimate of the second input: the first's input + output, plus the new text.
    assert s2.estimated_input_tokens == 40 + 70 + 4
    assert m.close() == []


def test_a_session_cut_mid_response_settles_on_estimates(
        meter_for, tokenizers: Tokenizers) -> None:  # type: ignore[no-untyped-def]
    m = meter_for()
    said = tokenizers.for_model("gpt-realtime").count("partial answer ")
    m.client(ev(type="session.update", session={"type": "realtime",
                                                "audio": {"output": {"format": {
                                                    "type": "audio/pcmu"}}}}))
    m.client(ev(type="input_audio_buffer.append", audio=audio(1.0)))
    response(m, "r1", "", 0.0, usage(12, 30, 10, 30))
    m.take_settled()
    m.client(ev(type="input_audio_buffer.append", audio=audio(0.5)))
    response(m, "r2", "partial answer", 0.0, done=False)
    m.server(ev(type="response.output_audio.delta", response_id="r2", delta=audio(1.0, 8000)))
    (s,) = m.close()
    assert s.input_source == s.output_source == "estimated"
    assert s.input_tokens == 12 + 30 + 5  # context so far, plus 0.5 s of new audio
    assert s.output_audio_tokens == 20  # 1 s of G.711 at 20/s
    assert s.output_tokens == 20 + said
    assert s.input_audio_tokens == 10 + 30 + 5


def test_output_audio_rate_is_learned_from_reported_usage(meter_for) -> None:  # type: ignore[no-untyped-def]
    cal = Calibration()
    m = meter_for(calibration=cal)
    for i in range(30):  # this model bills 30 tokens per second of output audio, not 20
        response(m, f"r{i}", "", 2.0, usage(10, 60, 0, 60))
    m.take_settled()
    assert cal.factor("gpt-realtime", "output_audio") == pytest.approx(1.5, rel=0.02)
    m.take_live()
    response(m, "last", "", 2.0, done=False)
    assert m.take_live()[3] == pytest.approx(60, abs=1)


def test_transcription_usage_settles_at_the_transcription_model(meter_for) -> None:  # type: ignore[no-untyped-def]
    m = meter_for()
    m.server(ev(type="session.updated", session={"audio": {"input": {
        "transcription": {"model": "gpt-4o-transcribe"}}}}))
    m.server(ev(type="conversation.item.input_audio_transcription.completed", item_id="i",
                transcript="hi", usage={"type": "tokens", "input_tokens": 14,
                                        "input_token_details": {"audio_tokens": 14,
                                                                "text_tokens": 0},
                                        "output_tokens": 3, "total_tokens": 17}))
    (s,) = m.take_settled()
    assert (s.model, s.input_tokens, s.output_tokens, s.input_audio_tokens) == \
        ("gpt-4o-transcribe", 14, 3, 14)
    assert realtime_usage({"type": "duration", "seconds": 3.2}) is None


def test_beta_event_names_and_formats(meter_for) -> None:  # type: ignore[no-untyped-def]
    m = meter_for(model="gpt-4o-realtime-preview")
    m.client(ev(type="session.update", session={"input_audio_format": "g711_alaw",
                                                "output_audio_format": "pcm16"}))
    m.client(ev(type="input_audio_buffer.append", audio=audio(2.0, 8000)))
    assert m.take_live()[1] == 20
    m.server(ev(type="response.created", response={"id": "r"}))
    m.server(ev(type="response.audio.delta", response_id="r", delta=audio(0.5)))
    m.server(ev(type="response.text.delta", response_id="r", delta="word " * 30))
    assert m.take_live()[3] == 10


def test_gemini_turns_settle_the_latest_usage_of_each_turn(meter_for) -> None:  # type: ignore[no-untyped-def]
    m = meter_for(GEMINI, None)
    m.client(ev(setup={"model": "models/gemini-live-2.5-flash-preview",
                       "systemInstruction": {"parts": [{"text": "Speak slowly."}]}}))
    assert m.model == "gemini-live-2.5-flash-preview"
    m.server(ev(setupComplete={}))
    m.client(ev(realtimeInput={"audio": {"data": audio(1.0, 32000),
                                         "mimeType": "audio/pcm;rate=16000"}}))
    assert m.take_live()[1] == 32
    part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": audio(0.5)}}
    m.server(ev(serverContent={"modelTurn": {"parts": [part]}}))
    m.server(ev(serverContent={"modelTurn": {"parts": [part]}},
                usageMetadata={"promptTokenCount": 40, "responseTokenCount": 10}))
    assert m.take_settled() == []  # the turn is not over: a later usage replaces this one
    m.server(ev(serverContent={"turnComplete": True}))
    meta = {"promptTokenCount": 41, "responseTokenCount": 32, "totalTokenCount": 73,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9},
                                    {"modality": "AUDIO", "tokenCount": 32}],
            "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 32}]}
    m.server(ev(usageMetadata=meta))
    (s,) = m.take_settled()
    assert (s.input_tokens, s.output_tokens, s.input_audio_tokens, s.output_audio_tokens) \
        == (41, 32, 32, 32)
    assert s.estimated_output_tokens == 32  # 1 s of 24 kHz audio at 32/s
    # A turn whose usage never comes settles on its estimate when the next one starts.
    m.server(ev(serverContent={"modelTurn": {"parts": [{"text": "Hello again"}]},
                               "turnComplete": True}))
    m.server(ev(serverContent={"modelTurn": {"parts": [{"text": "More"}]}}))
    (est,) = m.take_settled()
    assert est.output_source == "estimated" and est.input_tokens == 41 + 32
    (last,) = m.close()
    assert last.output_source == "estimated" and last.output_tokens == 1


def test_large_messages_are_measured_without_decoding_the_payload(meter_for) -> None:  # type: ignore[no-untyped-def]
    small, big = meter_for(), meter_for()
    payload = audio(180.0)  # 11.5 MB of base64
    msg = ev(type="input_audio_buffer.append", event_id="e1", audio=payload)
    assert len(msg) > 10 * 2**20
    big.client(msg)
    for i in range(0, len(payload), 40_000):
        small.client(ev(type="input_audio_buffer.append", audio=payload[i:i + 40_000]))
    assert big.take_live()[1] == small.take_live()[1] == 1800
    assert big.frame_errors == small.frame_errors == 0
    # An escaped payload (or none) falls back to a full parse, still right.
    m = meter_for()
    m.client(orjson.dumps({"type": "input_audio_buffer.append",
                           "audio": payload}).replace(b"+", b"\\u002b", 1))
    assert m.take_live()[1] == 1800


def test_generic_sessions_are_not_metered_and_protocols_are_sniffed(meter_for) -> None:  # type: ignore[no-untyped-def]
    m = meter_for(None, None)
    m.server(b"\x00\x01binary")
    m.client(b"anything")
    assert not m.active and m.frame_errors == 0
    m = meter_for(None, None)
    m.server(ev(type="session.created", event_id="e", session={"model": "gpt-realtime"}))
    assert m.protocol == OPENAI and m.model == "gpt-realtime"
    m = meter_for(None, None)
    m.server(ev(setupComplete={}))
    assert m.protocol == GEMINI


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(st.tuples(st.booleans(), st.one_of(
    st.binary(max_size=200), st.text(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4)
                 | st.dictionaries(st.sampled_from(
                     ["type", "response", "usage", "delta", "response_id", "audio",
                      "serverContent", "modelTurn", "parts", "usageMetadata", "session",
                      "item", "content", "text", "inlineData", "data", "mimeType", "setup",
                      "turnComplete", "input_tokens", "output_tokens", "id"]), c,
                     max_size=5)).map(lambda o: orjson.dumps(o)))), max_size=20),
    protocol=st.sampled_from([OPENAI, GEMINI, None]))
def test_no_message_sequence_raises(tokenizers: Tokenizers, messages: list[tuple[bool, object]],
                                    protocol: str | None) -> None:
    m = RealtimeMeter(protocol, None, tokenizers.for_model)
    for from_client, data in messages:
        assert isinstance(data, (bytes, str))
        (m.client if from_client else m.server)(data)
        assert all(n >= 0 for n in m.take_live())
    for s in m.close():
        assert s.input_tokens >= 0 and s.output_tokens >= 0


def test_the_delta_fast_path_counts_what_the_general_reader_counts(meter_for) -> None:  # type: ignore[no-untyped-def]
    """OpenAI's key order takes a few searches; any other order (or an escape) takes the JSON
    parser: the counts must not depend on which, even when one session mixes both."""
    fast, general = meter_for(), meter_for()
    words = ["Hel", "lo", " wörld", ", \u4f60\u597d", " again and", " again"]
    for m, always in ((fast, False), (general, True)):
        m.server(ev(type="response.created", response={"id": "r1"}))
        for i, w in enumerate(words * 20):
            kind = "response.output_audio_transcript.delta"
            fields = {"type": kind, "event_id": f"e{i}", "response_id": "r1",
                      "item_id": "it", "output_index": 0, "content_index": 0, "delta": w}
            reorder = always or i % 3 == 0
            if reorder:
                fields = dict(reversed(list(fields.items())))
            m.server(orjson.dumps(fields))
            audio_fields = {"type": "response.output_audio.delta", "event_id": f"a{i}",
                            "response_id": "r1", "item_id": "it", "output_index": 0,
                            "content_index": 0,  # sizes with and without base64 padding
                            "delta": base64.b64encode(bytes(2400 * (i % 3 + 1) + i % 3)).decode()}
            if reorder:
                audio_fields = dict(reversed(list(audio_fields.items())))
            m.server(orjson.dumps(audio_fields))
    assert fast.take_live() == general.take_live() != (0, 0, 0, 0)
    a, b = fast.close()[0], general.close()[0]
    assert (a.output_tokens, a.output_audio_tokens) == (b.output_tokens, b.output_audio_tokens)
    assert fast.frame_errors == general.frame_errors == 0
