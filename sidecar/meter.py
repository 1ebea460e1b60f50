"""Per-request accounting, sans-IO: live output estimate chunk by chunk, reported usage wins.

The proxy feeds the meter a copy of every response byte after writing it to the client. The
meter decodes its own copy (content-encoding, then frames), hands frames to the dialect, and
counts generated text incrementally. ``settle()`` turns what it saw into a ``Settlement``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .dialects.base import REASONING, TOOL, Dialect, RequestInfo, Sink, Usage
from .dialects.fastlane import raw_event
from .frames import Decoder, FrameError, SSEDecoder, decoder_for
from .structure import (
    InputObservation,
    InputOverheads,
    Observation,
    Overheads,
    has_media,
    input_overheads,
    overheads,
    thinking_requested,
    tool_definitions,
)
from .tokens import CountBudget, TextCounter, Tokenizer

# A slot's text of one read at least this long is "large": its exact count may be refused by
# the CountBudget (and then estimated from its length).
LARGE_TEXT = 1024
# The most of a partial event the fast lane keeps back for the next read (reads rarely end on an
# event's end when the upstream outpaces the proxy; longer events go to the decoder as before).
CARRY_MAX = 16 * 1024

# A non-streamed body larger than this is forwarded but not parsed: holding it would cost more
# memory than the accounting is worth (embeddings of big batches are the usual case).
MAX_METERED_BODY = 32 * 1024 * 1024

# Request keys that never carry tools or a thinking switch: a body made only of these skips the
# search for them (most requests).
_PLAIN_KEYS = frozenset({"model", "messages", "stream", "stream_options", "temperature",
                         "max_tokens", "max_completion_tokens", "top_p", "n", "stop", "user",
                         "seed", "presence_penalty", "frequency_penalty", "response_format",
                         "logprobs", "top_logprobs", "metadata", "store", "input",
                         "instructions", "prompt", "contents", "system"})

# An error message the provider sent is kept (records, settlement) up to this many characters.
ERROR_CHARS = 500
SOURCE_REPORTED = "reported"
SOURCE_ESTIMATED = "estimated"


@dataclass(slots=True)
class Settlement:
    """The final accounting of one request: counts and where each came from."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int | None
    cache_write_input_tokens: int | None
    reasoning_tokens: int | None
    input_source: str
    output_source: str
    reasoning_source: str | None
    estimated_input_tokens: int
    estimated_output_tokens: int
    model: str | None
    finish_reason: str | None
    error: str | None
    frame_errors: int
    first_token_at: float | None
    # Billing details as the provider reported them (None: not reported).
    cache_write_1h_input_tokens: int | None = None
    input_audio_tokens: int | None = None
    cached_audio_input_tokens: int | None = None
    output_audio_tokens: int | None = None
    billed_input_tokens: int | None = None
    billed_output_tokens: int | None = None
    server_tools: dict[str, int] | None = None
    service_tier: str | None = None
    reported_cost_usd: float | None = None

    @property
    def source(self) -> str:
        """One word for the record: reported, estimated, or mixed when input and output differ."""
        if self.input_source == self.output_source:
            return self.input_source
        return "mixed"


class _Inflater:
    """Decodes a gzip/deflate copy of the body for the meter; the client gets the original."""

    __slots__ = ("_obj",)

    def __init__(self, encoding: str) -> None:
        # 47 = auto-detect gzip or zlib header; raw deflate is tried if that fails.
        self._obj = zlib.decompressobj(47 if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        return self._obj.decompress(data)


def read_body(dialect: Dialect, body: bytes, sink: Sink) -> bool:
    """A whole (decoded) response body through the dialect's reader; False when there was
    nothing to read (an empty body) or it was not JSON (the sink is told)."""
    if not body.strip():
        return False
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        sink.malformed("response body is not JSON")
        return False
    dialect.parse_body(obj, sink)
    return True


def _inflater(content_encoding: str | None) -> _Inflater | None:
    """The decoder of a Content-Encoding: None for identity; ValueError for one the meter does
    not decode (the client gets the bytes all the same)."""
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("gzip", "x-gzip", "deflate"):
        return _Inflater(enc)
    if enc not in ("identity", ""):
        raise ValueError(f"content-encoding {enc!r} is not decoded by the meter")
    return None


def decode_whole(content_encoding: str | None, body: bytes) -> bytes:
    """A whole body, decoded as the meter decodes one read by read (ValueError, zlib.error)."""
    inflater = _inflater(content_encoding)
    return body if inflater is None else inflater.feed(body)


class Meter:
    """Accounting state for one request and its response."""

    def __init__(
        self,
        dialect: Dialect,
        info: RequestInfo,
        tokenizer: Tokenizer,
        clock: Callable[[], float],
        *,
        max_frame_size: int | None = None,
        fast_lane: bool = True,
        budget: CountBudget | None = None,
        output_overheads: Overheads | None = None,
        prompt_overheads: InputOverheads | None = None,
    ) -> None:
        self.dialect = dialect
        self.info = info
        self.tokenizer = tokenizer
        self._clock = clock
        self._max_frame_size = max_frame_size
        self._use_lane = fast_lane
        self._budget = budget
        self.estimated_chars = 0  # text counted by its length: the budget was spent
        self.model_name: str | None = info.model
        self.reported = Usage()
        self.prompt_estimate = 0
        self.raw_prompt_estimate = 0
        self.prompt_tools = 0  # tool definitions in the request
        self.prompt_estimated = False
        self.prompt_thinking = False  # the request turns extended thinking on
        self.input_overheads: InputOverheads = prompt_overheads or input_overheads(
            None, info.model, dialect.name, self.tool_choice)
        self.frame_errors = 0
        self.error_message: str | None = None
        self.finish: str | None = None
        self.first_token_at: float | None = None
        self.streamed = False
        self._counters: dict[tuple[Any, ...], TextCounter] = {}
        self._reasoning_slots: set[tuple[Any, ...]] = set()
        self.kinds: set[str] = set()  # kinds of text seen (content, reasoning, tool)
        # Learned corrections for models without a public tokenizer (1.0 otherwise).
        self.output_scale = 1.0
        self.input_scale = 1.0
        self._committed: float = 0  # raw output tokens committed by the counters
        # Structure the text does not show (structure.py): answers and tool calls seen, and
        # the tokens they add (set by the proxy from what the deployment learned).
        self.overheads: Overheads = output_overheads or overheads(None, info.model)
        self.answers = 0
        self.calls = 0
        self._choices: set[Any] | None = set() if getattr(dialect, "multi_choice", False) \
            else None
        self._structure: float = 0
        # Hidden reasoning per answer this model steadily shows (structure.hidden_reasoning):
        # counted live when an answer starts, and settled on when no usage arrives.
        self.hidden_expected: float = 0.0
        self._emitted = 0  # scaled output tokens handed to the live counter
        self._ended = False
        self._decoder: Decoder | None = None
        self._parser: Any = None
        self._lane: Any = None  # the dialect's fast lane for this response, if it has one
        # The start of an event a read ended in, kept back for the lane to read whole with the
        # next read (the decoder would only have buffered it: it holds no blank line).
        self._carry = b""
        self._carry_max = CARRY_MAX if max_frame_size is None else min(
            CARRY_MAX, max_frame_size // 2)
        # While the general path reads an event the fast lane could learn from: what it found.
        self._probe: list[Any] | None = None
        # Bytes the meter read, and how many of them the fast lane took (for its hit rate).
        self.bytes_metered = 0
        self.bytes_fast = 0
        self._inflater: _Inflater | None = None
        self._body: list[bytes] | None = None
        # Text seen during one feed(), per slot: each counter is fed once per upstream read.
        self._pending: dict[tuple[Any, ...], list[str]] = {}
        # Exact counts of texts this long wait for count_deferred() (None: counted in feed()).
        self.defer_chars: int | None = None
        self._deferred: list[tuple[TextCounter, str, bool]] = []
        self._body_size = 0
        self._undecodable = False

    # -- request side -------------------------------------------------------------------------

    def estimate_prompt(self) -> int:
        """Prompt tokens from the request body (may be offloaded to a thread for big bodies)."""
        self.prompt_estimated = True
        try:
            raw = self.dialect.estimate_prompt(self.info, self.tokenizer)
            self.raw_prompt_estimate = raw
            body = self.info.body
            if isinstance(body, dict) and not _PLAIN_KEYS.issuperset(body):
                self.prompt_tools = len(tool_definitions(body))
                self.prompt_thinking = thinking_requested(body)
            self.prompt_estimate = max(0, round(raw * self.input_scale + self.input_overheads
                                                .tokens(self.prompt_tools, self.prompt_thinking)))
        except Exception:  # a body we cannot read must not break the request
            self.malformed("request body could not be estimated")
            self.prompt_estimate = 0
        return self.prompt_estimate

    # -- response side ------------------------------------------------------------------------

    def start_response(self, content_type: str | None, content_encoding: str | None) -> None:
        try:
            self._inflater = _inflater(content_encoding)
        except ValueError as exc:
            self._undecodable = True
            self.malformed(str(exc))
        kwargs = {} if self._max_frame_size is None else {"max_frame_size": self._max_frame_size}
        self._decoder = decoder_for(content_type, json_stream=self.info.json_stream, **kwargs)
        if self._decoder is not None:
            self.streamed = True
            self._parser = self.dialect.stream_parser(self)
            lane = getattr(self.dialect, "fast_lane", None) if self._use_lane else None
            if lane is not None and isinstance(self._decoder, SSEDecoder):
                self._lane = lane(self._parser)
        else:
            self._body = []

    def feed(self, chunk: bytes) -> None:
        """A copy of bytes the client already received. Never raises."""
        if self._undecodable or not chunk:
            return
        try:
            if self._inflater is not None:
                chunk = self._inflater.feed(chunk)
            if self._decoder is not None:
                self.bytes_metered += len(chunk)
                if self._lane is not None:
                    if self._carry:
                        chunk = self._carry + chunk
                        self._carry = b""
                    chunk = self._lane_feed(chunk)
                if chunk:
                    self._frames(self._decoder.feed(chunk))
                self._count_pending()
            elif self._body is not None:
                self._body_size += len(chunk)
                if self._body_size > MAX_METERED_BODY:
                    self._body = None
                    self.malformed("response body too large to meter")
                else:
                    self._body.append(chunk)
        except zlib.error:
            self._undecodable = True
            self.malformed("compressed body could not be decoded")
        except Exception as exc:  # accounting must never break the stream
            self.malformed(f"meter error: {type(exc).__name__}")

    def _lane_feed(self, chunk: bytes) -> bytes:
        """Alternate between the fast lane (runs of events it knows) and the general path (the
        events between them); returns what is left for the general path."""
        dec = self._decoder
        lane = self._lane
        assert isinstance(dec, SSEDecoder)
        while chunk:
            if dec.idle():
                end, template, texts = lane.scan(chunk)
                if end:
                    assert template is not None
                    joined = "".join(texts)
                    if joined:
                        slot = template.slot
                        counter = self._counters.get(slot)
                        if end == len(chunk) and counter is not None and not self._pending \
                                and not (template.kind == TOOL and slot[-1] == "name"):
                            # The common read: all of it (or all that is left of it) one run of
                            # a known slot's events, nothing else read for any slot: counted
                            # now, as _count_pending would count it at the end of this read
                            # (a call's name goes through text(): it counts the call).
                            self._count(counter, joined)
                        else:
                            self.text(slot, template.kind, joined)
                    self.bytes_fast += end
                    chunk = chunk[end:]
                    continue
                k = chunk.find(b"\n\n") + 2  # the next event is not the lane's
                if k < 2:
                    # Only the start of an event is left. Where the decoder could not end an
                    # event in it either (no blank line of any kind), keep it back: the next
                    # read starts with it, and the lane may take the whole event.
                    if len(chunk) <= self._carry_max and b"\r" not in chunk:
                        self._carry = chunk
                        return b""
                    return chunk
            else:
                k = dec.pending_end(chunk)  # finish the event being assembled
            if k < 2:
                return chunk
            self._frames(dec.feed(chunk[:k]))
            chunk = chunk[k:]
            # Go on event by event only while that can pay: the lane knows what comes next, or
            # is still learning (a few dozen events per response at most).
            if not dec.idle() or not (lane.learning or lane.knows(chunk)):
                return chunk
        return chunk

    def end_of_body(self) -> None:
        """The upstream finished (or the stream was cut): flush decoders and text counters."""
        try:
            if self._decoder is not None and not self._undecodable:
                if self._carry:
                    self._frames(self._decoder.feed(self._carry))
                    self._carry = b""
                self._frames(self._decoder.close())
                self._count_pending()
            elif self._body is not None and not self._undecodable:
                body = b"".join(self._body)
                self._body = None
                if read_body(self.dialect, body, self):
                    self._count_pending()
        except Exception as exc:
            self.malformed(f"meter error: {type(exc).__name__}")
        self.count_deferred()
        for counter in self._counters.values():
            self._committed += counter.flush()
        self._ended = True

    def at_frame_boundary(self) -> bool:
        """True when a frame of our own could be written to the client without splitting one
        of the upstream's (SSE and NDJSON, uncompressed only)."""
        dec = self._decoder
        if self._inflater is not None or dec is None or self._carry:
            return False
        at = getattr(dec, "at_boundary", None)
        return bool(at is not None and at())

    def take_live(self) -> int:
        """Output tokens estimated since the last call (for the live counter).

        Mid-stream the scaled total is floored, so the live counter never runs ahead of the
        final estimate; at the end it is rounded, exactly as the settlement rounds it.
        """
        scaled = self._committed * self.output_scale + self._structure
        total = round(scaled) if self._ended else int(scaled + 1e-9)
        n = total - self._emitted
        if n <= 0:
            return 0
        self._emitted = total
        return n

    def _frames(self, items: list[Any]) -> None:
        parser = self._parser
        lane = self._lane
        for item in items:
            if isinstance(item, FrameError):
                self.malformed(item.reason)
            elif lane is not None and lane.learning and item.data is not None and \
                    item.id is None and item.retry is None and not item.fields:
                # Watch what the general path makes of the event: one text and nothing else
                # teaches the fast lane its shape.
                self._probe = []
                parser.on_frame(item)
                probe, self._probe = self._probe, None
                lane.watched()
                if len(probe) == 1 and probe[0] is not None:
                    slot, kind, text = probe[0]
                    lane.learn(raw_event(item.data, item.event), slot, kind, text)
            else:
                parser.on_frame(item)

    # -- Sink (called by the dialect) ---------------------------------------------------------

    def text(self, slot: tuple[Any, ...], kind: str, text: str) -> None:
        if self._probe is not None:
            self._probe.append((slot, kind, text))
        if kind == TOOL and slot[-1] == "name":  # dialects send a call's name once, at its start
            self.calls += 1
            self._structure = self.structure_tokens
        parts = self._pending.get(slot)
        if parts is None:
            self._pending[slot] = [text]
            if slot not in self._counters:
                self._counters[slot] = self.tokenizer.counter()
                self.kinds.add(kind)
                self._new_answer(slot)
                if kind == REASONING:
                    self._reasoning_slots.add(slot)
                    self._structure = self.structure_tokens
        else:
            parts.append(text)
        if self.first_token_at is None:
            self.first_token_at = self._clock()

    def _new_answer(self, slot: tuple[Any, ...]) -> None:
        """One answer per response; per choice where the format has several (OpenAI ``n``)."""
        choices = self._choices
        if choices is None:
            if self.answers:
                return
        elif slot[0] in choices:
            return
        else:
            choices.add(slot[0])
        self.answers += 1
        self._structure = self.structure_tokens

    def _count_pending(self) -> None:
        if self._pending:
            counters = self._counters
            for slot, parts in self._pending.items():
                self._count(counters[slot], parts[0] if len(parts) == 1 else "".join(parts))
            self._pending.clear()

    def _count(self, counter: TextCounter, text: str, defer: bool = True) -> None:
        """One slot's text of one read into its counter: exactly, or by its length once the
        shared tokenizing budget is spent (large texts only). An exact count of a text of
        ``defer_chars`` or more is set aside for count_deferred() (the proxy runs it in a worker:
        tiktoken releases the GIL), and so is everything after it until then, in order (those
        are decided when they are counted, as they would have been here)."""
        if defer and self._deferred:
            self._deferred.append((counter, text, False))
            return
        budget = self._budget
        if len(text) < LARGE_TEXT:
            self._committed += counter.feed(text)
        elif budget is not None and not budget.allow():
            self._committed += counter.estimate(text)
            self.estimated_chars += len(text)
        elif defer and self.defer_chars is not None and len(text) >= self.defer_chars:
            self._deferred.append((counter, text, True))
        else:
            self._count_exact(counter, text)

    def _count_exact(self, counter: TextCounter, text: str) -> None:
        budget = self._budget
        if budget is None or len(text) < LARGE_TEXT:
            self._committed += counter.feed(text)
        else:
            t = time.thread_time()  # CPU, not wall time: a thread may wait for the GIL
            self._committed += counter.feed(text)
            budget.spend(time.thread_time() - t)

    @property
    def deferred(self) -> bool:
        """Large texts wait for count_deferred()."""
        return bool(self._deferred)

    def count_deferred(self) -> None:
        """Count what _count set aside (may run in a worker thread while nothing else uses this
        meter). Never raises."""
        if not self._deferred:
            return
        items, self._deferred = self._deferred, []
        try:
            for counter, text, allowed in items:  # allowed: the budget already said yes
                if allowed:
                    self._count_exact(counter, text)
                else:
                    self._count(counter, text, defer=False)
        except Exception as exc:  # accounting must never break the stream
            self.malformed(f"meter error: {type(exc).__name__}")

    def usage(self, usage: Usage) -> None:
        if self._probe is not None:
            self._probe.append(None)
        self.reported.merge(usage)

    def model(self, name: str) -> None:
        if self._probe is not None:
            self._probe.append(None)
        self.model_name = name

    def finish_reason(self, reason: str) -> None:
        if self._probe is not None:
            self._probe.append(None)
        self.finish = reason

    def error(self, message: str) -> None:
        if self._probe is not None:
            self._probe.append(None)
        self.error_message = message[:ERROR_CHARS]

    def malformed(self, reason: str) -> None:
        if self._probe is not None:
            self._probe.append(None)
        self.frame_errors += 1

    # -- settlement ---------------------------------------------------------------------------

    @property
    def saw_reasoning(self) -> bool:
        return bool(self._reasoning_slots)

    @property
    def raw_estimated_output(self) -> float:
        """Output tokens by the tokenizer profile alone, before the learned correction."""
        return sum(c.total for c in self._counters.values())

    @property
    def _reasoning_raw(self) -> float:
        """Reasoning text shown, by the tokenizer profile alone."""
        return sum(self._counters[s].total for s in self._reasoning_slots)

    @property
    def structure_tokens(self) -> float:
        """Tokens the text does not show: answer framing, tool-call syntax, and the hidden
        reasoning this model steadily reports."""
        return self.overheads.tokens(
            self.answers, self.calls, bool(self._reasoning_slots) and not self.hidden_expected
        ) + self.hidden_expected * self.answers

    @property
    def estimated_output(self) -> int:
        raw = self.raw_estimated_output
        if self.hidden_expected and self._reasoning_slots:
            # a summary stands for the hidden reasoning counted in the structure: not both
            raw -= self._reasoning_raw
        return round(raw * self.output_scale + self.structure_tokens)

    @property
    def estimated_reasoning(self) -> int:
        if self.hidden_expected and self.answers:
            return round(self.hidden_expected * self.answers)
        return round(self._reasoning_raw * self.output_scale)

    # Reported reasoning more than this many times the reasoning text the stream showed was
    # not shown (a summary, or nothing): the estimate cannot see it.
    SUMMARY_RATIO = 2.0

    @property
    def hidden_reasoning(self) -> int:
        """Reported reasoning tokens whose text the stream never showed (0 when it showed it,
        or when no reasoning was reported)."""
        reported = self.reported.reasoning
        if not reported:
            return 0
        seen = self._reasoning_raw * self.output_scale
        return reported if seen * self.SUMMARY_RATIO < reported else 0

    def observation(self, model: str | None = None) -> Observation | None:
        """What this response teaches the estimator (None without reported output): the
        visible text and its structure against the reported output net of hidden reasoning
        and of audio (spoken answers are billed as audio tokens beside their transcript).
        ``model``: the name to learn under (default: the model the answer named)."""
        r = self.reported
        if r.output is None:
            return None
        hidden = self.hidden_reasoning
        raw = self.raw_estimated_output
        if hidden:  # a reasoning summary is not what was billed: leave it out of both sides
            raw -= self._reasoning_raw
        return Observation(model=model or self.model_name, raw_text=raw,
                           exact=self.tokenizer.exact,
                           answers=self.answers, calls=self.calls,
                           visible_output=max(r.output - hidden - (r.output_audio or 0), 0),
                           plain=not (self.calls or self._reasoning_slots or r.reasoning
                                      or TOOL in self.kinds),
                           reasoning=bool(self._reasoning_slots) and not hidden)

    @property
    def tool_choice(self) -> Any:
        body = self.info.body
        return body.get("tool_choice") if isinstance(body, dict) else None

    def input_observation(self, model: str | None = None) -> InputObservation | None:
        """What this request teaches the prompt estimator (None without reported input)."""
        r = self.reported
        if r.input is None or not self.raw_prompt_estimate:
            return None
        return InputObservation(model=model or self.model_name, api=self.dialect.name,
                                raw_text=self.raw_prompt_estimate, exact=self.tokenizer.exact,
                                tools=self.prompt_tools, tool_choice=self.tool_choice,
                                reported=r.input, thinking=self.prompt_thinking,
                                media=has_media(self.info.body))

    def settle(self, billable: bool = True) -> Settlement:
        """The final counts. ``billable=False`` (the provider never answered, or refused the
        request without usage or output) settles the unreported counts as zero."""
        r = self.reported
        if self.info.embeddings and r.output is None and not self._counters:
            r.output = 0  # nothing is generated: zero output is a fact, not an estimate
        est_out = self.estimated_output
        reasoning: int | None
        if r.reasoning is not None:
            reasoning, reasoning_source = r.reasoning, SOURCE_REPORTED
        elif self._reasoning_slots or (self.hidden_expected and self.answers):
            reasoning, reasoning_source = self.estimated_reasoning, SOURCE_ESTIMATED
        else:
            reasoning, reasoning_source = None, None
        return settlement(r, self.prompt_estimate if billable else 0, est_out, reasoning,
                          reasoning_source, self.prompt_estimate, self.model_name, self.finish,
                          self.error_message, self.frame_errors, self.first_token_at)


def settlement(r: Usage, prompt: int, output: int, reasoning: int | None,
               reasoning_source: str | None, estimated_input: int, model: str | None,
               finish: str | None, error: str | None, frame_errors: int,
               first_token_at: float | None) -> Settlement:
    """Reported usage wins, field by field; ``prompt`` and ``output`` stand where it is silent."""
    return Settlement(
        input_tokens=r.input if r.input is not None else prompt,
        output_tokens=r.output if r.output is not None else output,
        cached_input_tokens=r.cached_input,
        cache_write_input_tokens=r.cache_write_input,
        reasoning_tokens=reasoning,
        input_source=SOURCE_REPORTED if r.input is not None else SOURCE_ESTIMATED,
        output_source=SOURCE_REPORTED if r.output is not None else SOURCE_ESTIMATED,
        reasoning_source=reasoning_source,
        estimated_input_tokens=estimated_input,
        estimated_output_tokens=output,
        model=model,
        finish_reason=finish,
        error=error,
        frame_errors=frame_errors,
        first_token_at=first_token_at,
        cache_write_1h_input_tokens=r.cache_write_1h_input,
        input_audio_tokens=r.input_audio,
        cached_audio_input_tokens=r.cached_audio_input,
        output_audio_tokens=r.output_audio,
        billed_input_tokens=r.billed_input,
        billed_output_tokens=r.billed_output,
        server_tools=r.server_tools,
        service_tier=r.service_tier,
        reported_cost_usd=r.cost_usd,
    )


class Report:
    """The whole-answer lane's reader (sans-IO): what a non-streamed answer says about itself.

    The same dialect code that feeds a Meter (``parse_body``) feeds this Sink, which keeps the
    usage, model, finish reason and error, and only notes that text was there instead of
    counting it. ``settle`` gives the Settlement a Meter would give when the provider reported
    every count the settlement needs, without estimating anything; None when something must be
    estimated (the proxy then meters the body the general way).
    """

    __slots__ = (
        "error_message",
        "finish",
        "frame_errors",
        "model_name",
        "reasoning",
        "reported",
        "texts",
    )

    def __init__(self, model: str | None) -> None:
        self.reported: Usage | None = None
        self.model_name = model
        self.finish: str | None = None
        self.error_message: str | None = None
        self.frame_errors = 0
        self.texts = 0
        self.reasoning = False

    def read(self, dialect: Dialect, body: bytes) -> None:
        """Parse a whole (decoded) body, as Meter.end_of_body does."""
        read_body(dialect, body, self)

    def settle(self, embeddings: bool, hidden_expected: float) -> Settlement | None:
        """The settlement when nothing needs estimating, else None. ``hidden_expected``: the
        hidden reasoning the deployment learned for this model (a Meter would estimate it
        when reasoning goes unreported)."""
        r = self.reported
        if r is None or self.frame_errors or self.error_message is not None or r.input is None:
            return None
        if r.output is None and not (embeddings and not self.texts):
            return None
        if r.reasoning is not None:
            reasoning, reasoning_source = r.reasoning, SOURCE_REPORTED
        elif self.reasoning or (hidden_expected and self.texts):
            return None  # the reasoning would be estimated
        else:
            reasoning, reasoning_source = None, None
        if r.output is None:
            r.output = 0  # embeddings: nothing is generated (Meter.settle says the same)
        return settlement(r, 0, 0, reasoning, reasoning_source, 0, self.model_name,
                          self.finish, None, 0, None)

    # -- Sink ---------------------------------------------------------------------------------

    def text(self, slot: tuple[Any, ...], kind: str, text: str) -> None:
        self.texts += 1
        if kind == REASONING:
            self.reasoning = True

    def usage(self, usage: Usage) -> None:
        if self.reported is None:
            self.reported = usage  # dialects hand over a new Usage each time: no copy needed
        else:
            self.reported.merge(usage)

    def model(self, name: str) -> None:
        self.model_name = name

    def finish_reason(self, reason: str) -> None:
        self.finish = reason

    def error(self, message: str) -> None:
        self.error_message = message[:ERROR_CHARS]

    def malformed(self, reason: str) -> None:
        self.frame_errors += 1
