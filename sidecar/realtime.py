"""Realtime sessions over a WebSocket (OpenAI and Azure Realtime, Gemini Live), sans-IO.

The relay hands the meter a copy of every message it forwarded, from either side. The meter
keeps live estimates between the provider's usage events (text by the tokenizer, audio by its
duration: bytes of PCM16 or G.711 at the session's format) and turns each usage event into a
``Settlement`` as it arrives:

- OpenAI/Azure Realtime bill per response: ``response.done`` carries ``response.usage`` with
  ``input_token_details`` (text, audio, image, cached with its own breakdown) and
  ``output_token_details`` (text, audio). Input transcription reports its own ``usage`` in
  ``conversation.item.input_audio_transcription.completed``, billed at the transcription model.
- Gemini Live bills per turn: ``usageMetadata`` (per turn, repeated within a turn with growing
  counts, so the latest one of a turn wins) with per-modality details.

Each response's input is the whole conversation so far, so a response that ends without usage
is estimated as the context the last reported usage showed (input plus output) plus what the
client added since. Audio is estimated at a per-model rate in tokens per second, learned from
reported usage (``Calibration`` kinds ``input_audio`` and ``output_audio``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson

from .calibration import Calibration
from .dialects.base import Usage, as_int
from .dialects.gemini import usage_from as gemini_usage
from .meter import ERROR_CHARS, LARGE_TEXT, SOURCE_ESTIMATED, SOURCE_REPORTED, Settlement
from .tokens import CountBudget, TextCounter, Tokenizer

OPENAI = "openai-realtime"
GEMINI = "gemini-live"

# Tokens per second of audio before the first reported usage teaches the model's own rate.
# OpenAI's Realtime models bill about one token per 100 ms of user audio and one per 50 ms of
# assistant audio; Gemini documents 32 tokens per second of audio.
DEFAULT_RATES: dict[str, tuple[float, float]] = {OPENAI: (10.0, 20.0), GEMINI: (32.0, 32.0)}
# Audio rates come from the format, not a tokenizer: a learned rate may sit further from the
# default than a tokenizer correction may from 1.
AUDIO_BAND = (0.25, 4.0)

# Messages longer than this are read without decoding their base64 payload into a Python
# string: the payload's span is measured, cut out, and the rest parsed.
LARGE_MESSAGE = 64 * 1024
_PAYLOAD_KEY = re.compile(rb'"(?:audio|delta|data)"\s*:\s*"')

NOTHING = (0, 0, 0, 0)
# The events that carry audio, in the key order OpenAI sends them: read by two searches, not a
# JSON parse (anything else, or any other order, takes the general path).
_AUDIO_DELTA = (b'{"type":"response.output_audio.delta"', b'{"type":"response.audio.delta"')
_AUDIO_APPEND = b'{"type":"input_audio_buffer.append"'
_TEXT_DELTA = (b'{"type":"response.output_audio_transcript.delta"',
               b'{"type":"response.output_text.delta"', b'{"type":"response.text.delta"',
               b'{"type":"response.audio_transcript.delta"')
_CONTENT_INDEX = re.compile(rb'"content_index":(\d+)')

# Bytes per second of the formats the APIs accept.
PCM16_24K = 48_000.0
G711 = 8_000.0
_RATE = re.compile(r"rate\s*=\s*(\d+)")


def detect(path: str) -> str | None:
    """The realtime protocol of a WebSocket route, from its path (None: sniff the first
    server message, else relay unmetered)."""
    p = path.lower().rstrip("/")
    if p.endswith("/realtime"):
        return OPENAI
    if "bidigeneratecontent" in p:
        return GEMINI
    return None


def model_from_query(query: str) -> str | None:
    """OpenAI puts the model in ``?model=``; Azure names a deployment."""
    if not query:
        return None
    q = parse_qs(query)
    for name in ("model", "deployment"):
        values = q.get(name)
        if values and values[0]:
            return values[0]
    return None


def bytes_per_second(fmt: Any, default: float) -> float:
    """Bytes per second of audio in one of the formats the APIs name: OpenAI's beta strings
    (``pcm16``, ``g711_ulaw``, ``g711_alaw``), its GA objects (``{"type": "audio/pcm",
    "rate": 24000}``, ``audio/pcmu``, ``audio/pcma``), or a MIME type with a rate
    (``audio/pcm;rate=16000``, Gemini). Mono throughout."""
    if isinstance(fmt, dict):
        kind = str(fmt.get("type") or "")
        rate = as_int(fmt.get("rate"))
    elif isinstance(fmt, str):
        kind, rate = fmt, None
        m = _RATE.search(fmt)
        if m:
            rate = int(m.group(1))
    else:
        return default
    k = kind.split(";", 1)[0].strip().lower()
    if k in ("g711_ulaw", "g711_alaw", "audio/pcmu", "audio/pcma"):
        return float(rate or 8000)
    if k in ("pcm16", "audio/pcm", "audio/l16"):
        return 2.0 * (rate or 24000)
    return default


def b64_size(text: str | bytes, n: int | None = None) -> int:
    """Decoded size of a base64 string, without decoding it: ``n`` characters ending with
    ``text`` (by default, all of ``text``)."""
    if n is None:
        n = len(text)
    if not n:
        return 0
    pad = 0
    if text[-1:] in ("=", b"="):
        pad = 2 if text[-2:] in ("==", b"==") else 1
    return max(0, n * 3 // 4 - pad)


def _loads(data: str | bytes) -> tuple[Any, int]:
    """(message, size of its base64 payload when that was cut out unparsed)."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) <= LARGE_MESSAGE:
        return orjson.loads(raw), -1
    m = _PAYLOAD_KEY.search(raw)
    if m is None:
        return orjson.loads(raw), -1
    start = m.end()
    end = raw.find(b'"', start)
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return orjson.loads(raw), -1
    return orjson.loads(raw[:start] + raw[end:]), b64_size(raw[start:end])


@dataclass(slots=True)
class _Turn:
    """One response (OpenAI) or model turn (Gemini) being generated."""

    input_estimate: float  # its whole input: carried context, instructions, fresh input
    input_audio_estimate: float
    raw_input_audio: float  # fresh audio at the default rate (calibration, first turn only)
    counters: dict[tuple[Any, ...], TextCounter] = field(default_factory=dict)
    text_out: float = 0.0  # committed text tokens
    audio_out_seconds: float = 0.0
    ended: bool = False  # Gemini: turnComplete seen, usage may still follow
    final: bool = False  # Gemini: a usage arrived at or after the end of the turn
    usage: Usage | None = None
    status: str | None = None
    first_token_at: float | None = None
    f_text: float = 1.0  # the output text factor (1 for exact tokenizers)
    audio_rate: float = 0.0  # output audio tokens per second, learned factor applied


class RealtimeMeter:
    """Accounting for one WebSocket session. Every method is safe on any input: a message
    that cannot be read is counted in ``frame_errors``, never raised."""

    def __init__(self, protocol: str | None, model: str | None,
                 tokenizer_for: Callable[[str | None], Tokenizer],
                 calibration: Calibration | None = None,
                 clock: Callable[[], float] | None = None,
                 budget: CountBudget | None = None) -> None:
        self.protocol = protocol
        self._budget = budget
        self.estimated_chars = 0  # input text counted by its length (tokenizer CPU budget)
        self.model = model
        self._tokenizer_for = tokenizer_for
        self.tokenizer = tokenizer_for(model)
        self.calibration = calibration or Calibration()
        self._clock = clock
        self.frame_errors = 0
        self.error_message: str | None = None
        self.messages = 0  # metered messages, both directions
        self._sniffed = protocol is not None
        in_rate, out_rate = DEFAULT_RATES.get(protocol or "", (10.0, 20.0))
        self._in_rate, self._out_rate = in_rate, out_rate
        self._in_bps = PCM16_24K if protocol != GEMINI else 32_000.0
        self._out_bps = PCM16_24K
        self.transcription_model: str | None = None
        self._instructions = 0.0
        self._carried = 0.0  # context tokens from earlier turns, instructions excluded
        self._carried_audio = 0.0
        self._fresh = 0.0  # input added since the last turn began (live already)
        self._fresh_audio = 0.0
        self._fresh_raw_audio = 0.0
        self._turns: dict[str, _Turn] = {}
        self._gemini_turn: _Turn | None = None
        self._settled_any = False
        # Live estimates: input text, input audio, output text, output audio.
        self._live = [0.0, 0.0, 0.0, 0.0]
        self._dirty = False  # _live moved since take_live() last looked
        self._emitted = [0, 0, 0, 0]
        self.settled: list[Settlement] = []
        self._errors_reported = 0

    # -- what the relay calls -----------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.protocol is not None

    def client(self, data: str | bytes) -> None:
        """A message the client sent (already forwarded)."""
        if self.protocol == OPENAI and type(data) is bytes and data.startswith(_AUDIO_APPEND):
            size = _field_size(data, b'"audio":"')
            if size >= 0:
                self.messages += 1
                self._add_fresh(audio_bytes=size)
                return
        if self.protocol is not None:
            self._dispatch(data, self._openai_client if self.protocol == OPENAI
                           else self._gemini_client, "client")

    def server(self, data: str | bytes) -> None:
        """A message the upstream sent (already forwarded)."""
        if self.protocol == OPENAI and type(data) is bytes:
            try:
                if self._openai_fast(data):
                    self.messages += 1
                    return
            except Exception as exc:  # accounting must never break the session
                self._malformed(f"server message: {type(exc).__name__}")
                return
        if self.protocol is None:
            if self._sniffed:
                return
            self._sniff(data)
            if self.protocol is None:
                return
        self._dispatch(data, self._openai_server if self.protocol == OPENAI
                       else self._gemini_server, "server")

    def _openai_fast(self, data: bytes) -> bool:
        """The deltas that make most of a session, read by a few searches; False when the
        message is anything else (or not plainly shaped): the general path reads it."""
        if data.startswith(_AUDIO_DELTA):
            rid = _field(data, b'"response_id":"', 256)
            turn = self._turns.get(rid) if rid is not None else None
            size = _field_size(data, b'"delta":"') if turn is not None else -1
            if turn is None or size < 0:
                return False
            self._audio_out(turn, size)
            return True
        if data.startswith(_TEXT_DELTA):
            rid = _field(data, b'"response_id":"', 256)
            turn = self._turns.get(rid) if rid is not None else None
            delta = _field(data, b'"delta":"') if turn is not None else None
            if turn is None or delta is None or data.count(b'"delta":"') != 1:
                return False
            item = _field(data, b'"item_id":"', 256)
            m = _CONTENT_INDEX.search(data)
            self._text_out(turn, (item, int(m.group(1)) if m else None),
                           delta.encode("latin-1").decode("utf-8"))
            return True
        return False

    def _dispatch(self, data: str | bytes, handler: Callable[[dict[str, Any], int], None],
                  side: str) -> None:
        msg = self._read(data)
        if msg is None:
            return
        try:
            handler(*msg)
        except Exception as exc:  # accounting must never break the session
            self._malformed(f"{side} message: {type(exc).__name__}")

    def take_live(self) -> tuple[int, int, int, int]:
        """(input text, input audio, output text, output audio) tokens estimated since the
        last call, floored so the live counters never run ahead of the estimate."""
        if not self._dirty:
            return NOTHING
        self._dirty = False
        live = self._live
        out = []
        for i in range(4):
            n = int(live[i] + 1e-9) - self._emitted[i]
            if n > 0:
                self._emitted[i] += n
            out.append(max(n, 0))
        return out[0], out[1], out[2], out[3]

    def take_errors(self) -> int:
        """Frame errors not yet carried by a settlement."""
        n, self._errors_reported = self.frame_errors - self._errors_reported, self.frame_errors
        return n

    def take_settled(self) -> list[Settlement]:
        out, self.settled = self.settled, []
        return out

    def close(self) -> list[Settlement]:
        """The session ended: turns still open settle on their estimates."""
        try:
            for rid in list(self._turns):
                self._settle(self._turns.pop(rid), None)
            if self._gemini_turn is not None:
                turn, self._gemini_turn = self._gemini_turn, None
                self._settle(turn, turn.usage)
        except Exception as exc:
            self._malformed(f"settlement: {type(exc).__name__}")
        return self.take_settled()

    # -- reading ------------------------------------------------------------------------------

    def _read(self, data: str | bytes) -> tuple[dict[str, Any], int] | None:
        self.messages += 1
        head = data[:1] if isinstance(data, str) else data[:1].decode("latin-1")
        if head != "{":
            if isinstance(data, bytes) and data.lstrip()[:1] != b"{":
                return None  # binary media frames of a protocol of its own: relayed as they are
            if isinstance(data, str) and not data.lstrip().startswith("{"):
                self._malformed("text message is not a JSON object")
                return None
        try:
            obj, payload = _loads(data)
        except (orjson.JSONDecodeError, UnicodeError):
            self._malformed("message is not JSON")
            return None
        if not isinstance(obj, dict):
            self._malformed("message is not a JSON object")
            return None
        return obj, payload

    def _sniff(self, data: str | bytes) -> None:
        """Recognize a realtime protocol by the first message the server sends."""
        self._sniffed = True
        head = data[:256] if isinstance(data, bytes) else data[:256].encode()
        if b'"session.created"' in head or b'"transcription_session.created"' in head:
            self.protocol = OPENAI
        elif b'"setupComplete"' in head:
            self.protocol = GEMINI
        else:
            return
        self._in_rate, self._out_rate = DEFAULT_RATES[self.protocol]
        if self.protocol == GEMINI:
            self._in_bps = 32_000.0

    def _malformed(self, reason: str) -> None:
        self.frame_errors += 1

    def _set_model(self, model: Any) -> None:
        if isinstance(model, str) and model:
            name = model.removeprefix("models/")
            if name != self.model:
                self.model = name
                self.tokenizer = self._tokenizer_for(name)

    def _count(self, text: Any) -> float:
        if not isinstance(text, str) or not text:
            return 0.0
        budget = self._budget
        if budget is not None and len(text) >= LARGE_TEXT:
            if not budget.allow():
                self.estimated_chars += len(text)
                return self.tokenizer.counter().estimate(text) * self._factor("input")
            t = time.perf_counter()
            n = self.tokenizer.weigh(text)
            budget.spend(time.perf_counter() - t)
            return n * self._factor("input")
        return self.tokenizer.weigh(text) * self._factor("input")

    def _factor(self, kind: str) -> float:
        if kind in ("input", "output") and self.tokenizer.exact:
            return 1.0
        return self.calibration.factor(self.model, kind)

    def _add_fresh(self, text_tokens: float = 0.0, audio_bytes: int = 0) -> None:
        audio = 0.0
        if audio_bytes > 0:
            seconds = audio_bytes / self._in_bps
            self._fresh_raw_audio += seconds * self._in_rate
            audio = seconds * self._in_rate * self._factor("input_audio")
        self._fresh += text_tokens + audio
        self._fresh_audio += audio
        self._live[0] += text_tokens
        self._live[1] += audio
        self._dirty = True

    def _begin(self) -> _Turn:
        """A turn starts: its input is the context so far; what was not live yet becomes live."""
        first = not self._settled_any and not self._turns and self._gemini_turn is None
        base = self._carried + self._instructions
        turn = _Turn(input_estimate=base + self._fresh,
                     input_audio_estimate=self._carried_audio + self._fresh_audio,
                     raw_input_audio=self._fresh_raw_audio if first and not self._carried
                     else 0.0)
        self._live[0] += base - self._carried_audio
        self._live[1] += self._carried_audio
        self._dirty = True
        self._fresh = self._fresh_audio = self._fresh_raw_audio = 0.0
        # The learned factors, read once per turn: its live counts and its estimate agree.
        turn.f_text = self._factor("output")
        turn.audio_rate = self._out_rate * self._factor("output_audio")
        return turn

    def _text_out(self, turn: _Turn, slot: tuple[Any, ...], text: Any) -> None:
        if not isinstance(text, str) or not text:
            return
        c = turn.counters.get(slot)
        if c is None:
            c = turn.counters[slot] = self.tokenizer.counter()
        n = c.feed(text)
        if n:
            turn.text_out += n
            self._live[2] += n * turn.f_text
            self._dirty = True
        self._first_token(turn)

    def _audio_out(self, turn: _Turn, nbytes: int) -> None:
        if nbytes <= 0:
            return
        seconds = nbytes / self._out_bps
        turn.audio_out_seconds += seconds
        self._live[3] += seconds * turn.audio_rate
        self._dirty = True
        self._first_token(turn)

    def _first_token(self, turn: _Turn) -> None:
        if turn.first_token_at is None and self._clock is not None:
            turn.first_token_at = self._clock()

    # -- OpenAI / Azure Realtime --------------------------------------------------------------

    def _openai_formats(self, session: Any) -> None:
        if not isinstance(session, dict):
            return
        self._set_model(session.get("model"))
        if "instructions" in session and isinstance(session.get("instructions"), str):
            self._instructions = self._count(session["instructions"])
        audio = session.get("audio")
        if isinstance(audio, dict):  # GA shape
            inp, out = audio.get("input"), audio.get("output")
            if isinstance(inp, dict):
                if "format" in inp:
                    self._in_bps = bytes_per_second(inp["format"], self._in_bps)
                tr = inp.get("transcription")
                if isinstance(tr, dict) and isinstance(tr.get("model"), str):
                    self.transcription_model = tr["model"]
            if isinstance(out, dict) and "format" in out:
                self._out_bps = bytes_per_second(out["format"], self._out_bps)
        if "input_audio_format" in session:  # beta shape
            self._in_bps = bytes_per_second(session["input_audio_format"], self._in_bps)
        if "output_audio_format" in session:
            self._out_bps = bytes_per_second(session["output_audio_format"], self._out_bps)
        tr = session.get("input_audio_transcription")
        if isinstance(tr, dict) and isinstance(tr.get("model"), str):
            self.transcription_model = tr["model"]

    def _openai_client(self, obj: dict[str, Any], payload: int) -> None:
        kind = obj.get("type")
        if kind == "input_audio_buffer.append":
            size = payload if payload >= 0 else _b64_field(obj.get("audio"))
            self._add_fresh(audio_bytes=size)
        elif kind in ("session.update", "transcription_session.update"):
            self._openai_formats(obj.get("session"))
        elif kind == "conversation.item.create":
            item = obj.get("item")
            if isinstance(item, dict):
                text, audio = _item_input(item)
                if payload >= 0:
                    audio += payload
                self._add_fresh(self._count(text), audio)
        elif kind == "response.create":
            resp = obj.get("response")
            if isinstance(resp, dict):
                self._add_fresh(self._count(resp.get("instructions")))

    def _openai_server(self, obj: dict[str, Any], payload: int) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            rid = obj.get("response_id")
            turn = self._turns.get(rid) if isinstance(rid, str) else None
            if turn is None:
                if not isinstance(rid, str):
                    return
                turn = self._turns[rid] = self._begin()
            if kind in ("response.output_audio.delta", "response.audio.delta"):
                self._audio_out(turn, payload if payload >= 0 else _b64_field(obj.get("delta")))
            elif kind in ("response.output_text.delta", "response.text.delta",
                          "response.output_audio_transcript.delta",
                          "response.audio_transcript.delta",
                          "response.function_call_arguments.delta"):
                self._text_out(turn, (obj.get("item_id"), obj.get("content_index")),
                               obj.get("delta"))
            return
        if kind == "response.created":
            resp = obj.get("response")
            rid = resp.get("id") if isinstance(resp, dict) else None
            if isinstance(rid, str) and rid not in self._turns:
                self._turns[rid] = self._begin()
        elif kind == "response.done":
            resp = obj.get("response")
            if not isinstance(resp, dict):
                return
            rid = resp.get("id")
            turn = self._turns.pop(rid, None) if isinstance(rid, str) else None
            if turn is None:
                turn = self._begin()
            turn.status = resp.get("status") if isinstance(resp.get("status"), str) else None
            usage = realtime_usage(resp.get("usage"))
            self._settle(turn, usage)
        elif kind in ("session.created", "session.updated", "transcription_session.created",
                      "transcription_session.updated"):
            self._openai_formats(obj.get("session"))
        elif kind == "conversation.item.input_audio_transcription.completed":
            usage = realtime_usage(obj.get("usage"))
            if usage is not None:
                self._settle_transcription(usage)
        elif kind == "error":
            err = obj.get("error")
            msg = err.get("message") if isinstance(err, dict) else None
            self.error_message = str(msg or "error event")[:ERROR_CHARS]

    # -- Gemini Live --------------------------------------------------------------------------

    def _gemini_client(self, obj: dict[str, Any], payload: int) -> None:
        setup = obj.get("setup")
        if isinstance(setup, dict):
            self._set_model(setup.get("model"))
            si = setup.get("systemInstruction") or setup.get("system_instruction")
            if si is not None:
                self._instructions = self._count(" ".join(_texts(si)))
            return
        rt = obj.get("realtimeInput") or obj.get("realtime_input")
        if isinstance(rt, dict):
            audio = 0
            text = rt.get("text") if isinstance(rt.get("text"), str) else ""
            for part in (rt.get("audio"), *(rt.get("mediaChunks") or ())):
                if isinstance(part, dict):
                    mime = str(part.get("mimeType") or part.get("mime_type") or "")
                    if mime.startswith("audio/"):
                        self._in_bps = bytes_per_second(mime, self._in_bps)
                        audio += payload if payload >= 0 else _b64_field(part.get("data"))
            self._add_fresh(self._count(text), audio)
            return
        cc = obj.get("clientContent") or obj.get("client_content")
        if isinstance(cc, dict):
            self._add_fresh(self._count(" ".join(_texts(cc.get("turns")))))
            return
        tr = obj.get("toolResponse") or obj.get("tool_response")
        if isinstance(tr, dict):
            self._add_fresh(self._count(orjson.dumps(tr).decode()))

    def _gemini_server(self, obj: dict[str, Any], payload: int) -> None:
        sc = obj.get("serverContent") or obj.get("server_content")
        turn = self._gemini_turn
        if isinstance(sc, dict):
            mt = sc.get("modelTurn") or sc.get("model_turn")
            if isinstance(mt, dict):
                if turn is not None and turn.ended:
                    self._gemini_turn = None
                    self._settle(turn, turn.usage)  # its usage never came
                    turn = None
                if turn is None:
                    turn = self._gemini_turn = self._begin()
                for part in mt.get("parts") or ():
                    if not isinstance(part, dict):
                        continue
                    if isinstance(part.get("text"), str):
                        self._text_out(turn, ("text",), part["text"])
                    data = part.get("inlineData") or part.get("inline_data")
                    if isinstance(data, dict):
                        mime = str(data.get("mimeType") or data.get("mime_type") or "")
                        if mime.startswith("audio/"):
                            self._out_bps = bytes_per_second(mime, self._out_bps)
                            self._audio_out(turn, payload if payload >= 0
                                            else _b64_field(data.get("data")))
            if turn is not None and (sc.get("turnComplete") or sc.get("turn_complete")
                                     or sc.get("interrupted")):
                turn.ended = True
        tc = obj.get("toolCall") or obj.get("tool_call")
        if isinstance(tc, dict):
            if turn is None:
                turn = self._gemini_turn = self._begin()
            self._text_out(turn, ("tool",), orjson.dumps(tc).decode())
        meta = obj.get("usageMetadata") or obj.get("usage_metadata")
        if isinstance(meta, dict):
            usage = gemini_usage(meta)
            if usage is not None:
                if turn is None:
                    turn = self._gemini_turn = self._begin()
                turn.usage = usage
                turn.final = turn.ended
        # Usage arrives with the end of the turn or after it (then it is the turn's last); a
        # usage seen mid-turn waits, and is settled if no later one comes before the next turn.
        if turn is not None and turn.ended and turn.final:
            self._gemini_turn = None
            self._settle(turn, turn.usage)

    # -- settlement ---------------------------------------------------------------------------

    def _settle(self, turn: _Turn, usage: Usage | None) -> None:
        f_out = turn.f_text
        flushed = sum(c.flush() for c in turn.counters.values())
        turn.text_out += flushed
        self._live[2] += flushed * f_out
        self._dirty = True
        text_est = turn.text_out * f_out
        audio_est = turn.audio_out_seconds * turn.audio_rate
        est_out = round(text_est + audio_est)
        est_in = round(turn.input_estimate)
        errors = self.take_errors()
        if usage is not None and usage.input is not None and usage.output is not None:
            self._learn(turn, usage)
            s = Settlement(
                input_tokens=usage.input, output_tokens=usage.output,
                cached_input_tokens=usage.cached_input, cache_write_input_tokens=None,
                reasoning_tokens=usage.reasoning,
                input_source=SOURCE_REPORTED, output_source=SOURCE_REPORTED,
                reasoning_source=SOURCE_REPORTED if usage.reasoning is not None else None,
                estimated_input_tokens=est_in, estimated_output_tokens=est_out,
                model=self.model, finish_reason=turn.status, error=None,
                frame_errors=errors, first_token_at=turn.first_token_at,
                input_audio_tokens=usage.input_audio,
                cached_audio_input_tokens=usage.cached_audio_input,
                output_audio_tokens=usage.output_audio)
            context = float(usage.input + usage.output)
            context_audio = float((usage.input_audio or 0) + (usage.output_audio or 0))
        else:
            in_audio = round(turn.input_audio_estimate)
            s = Settlement(
                input_tokens=est_in, output_tokens=est_out, cached_input_tokens=None,
                cache_write_input_tokens=None, reasoning_tokens=None,
                input_source=SOURCE_ESTIMATED, output_source=SOURCE_ESTIMATED,
                reasoning_source=None, estimated_input_tokens=est_in,
                estimated_output_tokens=est_out, model=self.model,
                finish_reason=turn.status, error=None, frame_errors=errors,
                first_token_at=turn.first_token_at,
                input_audio_tokens=in_audio if in_audio else None,
                output_audio_tokens=round(audio_est) if audio_est else None)
            context = float(est_in + est_out)
            context_audio = in_audio + audio_est
        self._carried = max(0.0, context - self._instructions)
        self._carried_audio = context_audio
        self._settled_any = True
        self.settled.append(s)

    def _settle_transcription(self, usage: Usage) -> None:
        self.settled.append(Settlement(
            input_tokens=usage.input or 0, output_tokens=usage.output or 0,
            cached_input_tokens=None, cache_write_input_tokens=None, reasoning_tokens=None,
            input_source=SOURCE_REPORTED, output_source=SOURCE_REPORTED, reasoning_source=None,
            estimated_input_tokens=0, estimated_output_tokens=0,
            model=self.transcription_model or self.model, finish_reason=None, error=None,
            frame_errors=0, first_token_at=None, input_audio_tokens=usage.input_audio))

    def _learn(self, turn: _Turn, usage: Usage) -> None:
        cal = self.calibration
        if usage.output_audio is not None and turn.audio_out_seconds:
            cal.observe(self.model, "output_audio", turn.audio_out_seconds * self._out_rate,
                        usage.output_audio, band=AUDIO_BAND)
        if usage.input_audio is not None and turn.raw_input_audio:
            cal.observe(self.model, "input_audio", turn.raw_input_audio, usage.input_audio,
                        band=AUDIO_BAND)
        if not self.tokenizer.exact and turn.text_out and usage.output is not None:
            text = usage.output - (usage.output_audio or 0)
            cal.observe(self.model, "output", turn.text_out, text)


def realtime_usage(obj: Any) -> Usage | None:
    """OpenAI Realtime's usage object (``response.usage``, or a transcription's ``usage``)."""
    if not isinstance(obj, dict) or obj.get("type") == "duration":
        return None
    u = Usage(input=as_int(obj.get("input_tokens")), output=as_int(obj.get("output_tokens")),
              total=as_int(obj.get("total_tokens")))
    inp = obj.get("input_token_details")
    if isinstance(inp, dict):
        u.input_audio = as_int(inp.get("audio_tokens"))
        u.cached_input = as_int(inp.get("cached_tokens"))
        cached = inp.get("cached_tokens_details")
        if isinstance(cached, dict):
            u.cached_audio_input = as_int(cached.get("audio_tokens"))
    out = obj.get("output_token_details")
    if isinstance(out, dict):
        u.output_audio = as_int(out.get("audio_tokens"))
    if u.input is not None and u.output is None:
        u.output = 0  # transcription usage without output (input-only billing)
    return None if u.empty() else u


def _field(raw: bytes, key: bytes, cap: int | None = None) -> str | None:
    """A string value of a flat JSON object, by search (None: not found, or escaped); as
    Latin-1, so any bytes decode."""
    i = raw.find(key)
    if i < 0:
        return None
    start = i + len(key)
    end = raw.find(b'"', start, None if cap is None else start + cap)
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return None
    return raw[start:end].decode("latin-1")


def _field_size(raw: bytes, key: bytes) -> int:
    """Decoded size of the base64 string value that ends the object (``..."key":"<b64>"}``),
    without reading the payload: it is often hundreds of KB, and base64 has no quote or
    backslash (-1: another shape; the general path reads it)."""
    i = raw.find(key)
    end = len(raw) - 2
    if i < 0 or not raw.endswith(b'"}'):
        return -1
    start = i + len(key)
    if end < start or raw.find(b'"', max(start, end - 64), end) >= 0 \
            or raw.find(b"\\", max(start, end - 64), end) >= 0:
        return -1
    return b64_size(raw[max(start, end - 2):end], end - start)


def _b64_field(value: Any) -> int:
    return b64_size(value) if isinstance(value, str) else 0


def _item_input(item: dict[str, Any]) -> tuple[str, int]:
    """(text, audio bytes) a conversation item adds to the context."""
    texts: list[str] = []
    audio = 0
    for key in ("output", "arguments", "name"):
        if isinstance(item.get(key), str):
            texts.append(item[key])
    for part in item.get("content") or ():
        if not isinstance(part, dict):
            continue
        for key in ("text", "transcript"):
            if isinstance(part.get(key), str):
                texts.append(part[key])
        if isinstance(part.get("audio"), str):
            audio += b64_size(part["audio"])
    return " ".join(texts), audio


def _texts(node: Any) -> list[str]:
    """Texts of Gemini content: a Content, a list of them, or parts."""
    out: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if isinstance(n.get("text"), str):
                out.append(n["text"])
            for key in ("parts", "turns"):
                if isinstance(n.get(key), list):
                    stack.extend(reversed(n[key]))
        elif isinstance(n, list):
            stack.extend(reversed(n))
        elif isinstance(n, str):
            out.append(n)
    return out

