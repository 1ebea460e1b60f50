"""What every provider dialect reads from a request and reports from a response (sans-IO)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import orjson

from ..frames import Frame
from ..tokens import Tokenizer


@dataclass(slots=True)
class Usage:
    """Provider-reported usage. None means the provider did not say.

    ``input`` is all input tokens including cached ones; ``output`` includes reasoning;
    ``cached_input``, ``cache_write_input`` (and its ``cache_write_1h_input`` part), ``reasoning``,
    ``input_audio``, ``cached_audio_input`` and ``output_audio`` are subsets. ``billed_*`` are set
    where a provider bills fewer units than it processed (Cohere's ``billed_units``);
    ``server_tools`` counts server-side tool calls billed per call; ``cost_usd`` is a cost the
    provider stated itself (OpenRouter ``usage.cost``, xAI ``cost_in_usd_ticks``).
    """

    input: int | None = None
    output: int | None = None
    cached_input: int | None = None
    cache_write_input: int | None = None
    reasoning: int | None = None
    total: int | None = None
    cache_write_1h_input: int | None = None
    input_audio: int | None = None
    cached_audio_input: int | None = None
    output_audio: int | None = None
    billed_input: int | None = None
    billed_output: int | None = None
    server_tools: dict[str, int] | None = None
    service_tier: str | None = None
    cost_usd: float | None = None

    def merge(self, newer: Usage) -> None:
        """Later frames carry cumulative counts: each field the newer frame states replaces ours."""
        for name in _USAGE_FIELDS:
            value = getattr(newer, name)
            if value is not None:
                setattr(self, name, value)

    def empty(self) -> bool:
        """No token count was reported (a service tier alone is not usage)."""
        return all(getattr(self, name) is None for name in COUNT_FIELDS)


_USAGE_FIELDS = tuple(f.name for f in fields(Usage))
COUNT_FIELDS = ("input", "output", "cached_input", "cache_write_input", "reasoning", "total",
                "cache_write_1h_input", "input_audio", "cached_audio_input", "output_audio",
                "billed_input", "billed_output", "server_tools", "cost_usd")


def tool_calls(**counts: int | None) -> dict[str, int] | None:
    """Server-side tool calls worth recording (a zero count is not a call)."""
    out = {k: v for k, v in counts.items() if v}
    return out or None


# Kinds of generated text; all count as output, "reasoning" is also counted on its own.
CONTENT = "content"
REASONING = "reasoning"
TOOL = "tool"


class Sink(Protocol):
    """Receives what a dialect finds in the response; implemented by the meter."""

    def text(self, slot: tuple[Any, ...], kind: str, text: str) -> None: ...

    def usage(self, usage: Usage) -> None: ...

    def model(self, name: str) -> None: ...

    def finish_reason(self, reason: str) -> None: ...

    def error(self, message: str) -> None: ...

    def malformed(self, reason: str) -> None: ...


@dataclass(slots=True)
class RequestInfo:
    """What the sidecar learns from a request before forwarding it."""

    model: str | None = None
    stream: bool = False
    body: Any = None  # the parsed JSON body, kept for prompt estimation
    json_stream: bool = False  # the answer is a streamed JSON array (Gemini without alt=sse)
    embeddings: bool = False  # no generated output: output settles as reported 0


class StreamParser(Protocol):
    def on_frame(self, frame: Frame) -> None: ...


class Dialect(Protocol):
    name: str

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo: ...

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int: ...

    def stream_parser(self, sink: Sink) -> StreamParser: ...

    def parse_body(self, obj: Any, sink: Sink) -> None: ...


def as_int(value: Any) -> int | None:
    """A token count from JSON: non-negative ints (and integral floats); anything else is None,
    as if the provider had not said (a negative count would corrupt every counter after it)."""
    if type(value) is int:  # the common case first (bool is not int here)
        return value if value >= 0 else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value >= 0:
        return value
    return None


def load_json(body: bytes) -> Any:
    """Parsed JSON, or None when the body is empty or not JSON."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def request_info(body: bytes, model: str | None = None, stream: bool = False) -> RequestInfo:
    """Model and stream flag of a JSON request body; the body's model wins over one given (from
    the path), and a boolean ``stream`` in the body wins over the format's default."""
    info = RequestInfo(model=model, stream=stream)
    obj = load_json(body)
    if isinstance(obj, dict):
        info.body = obj
        name = obj.get("model")
        if isinstance(name, str) and name:
            info.model = name
        if isinstance(obj.get("stream"), bool):
            info.stream = obj["stream"]
    return info


class JSONFrameParser:
    """Base for streams whose frames carry one JSON object each; subclasses read the object."""

    __slots__ = ("sink",)

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def on_frame(self, frame: Frame) -> None:
        data = frame.data
        if data is None or data == b"[DONE]":
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.sink.malformed("invalid JSON in data frame")
            return
        if isinstance(obj, dict):
            self.on_object(obj, frame)
        else:
            self.sink.malformed("data frame is not a JSON object")

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        raise NotImplementedError


def texts_of(node: Any, keys: frozenset[str] = frozenset({"text", "content"})) -> list[str]:
    """Every string under the given keys, anywhere in a JSON tree (for prompt estimates)."""
    out: list[str] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for k, v in cur.items():
                if isinstance(v, str):
                    if k in keys:
                        out.append(v)
                elif isinstance(v, dict | list):
                    stack.append(v)
        elif isinstance(cur, list):
            for v in cur:
                if isinstance(v, str):
                    out.append(v)
                elif isinstance(v, dict | list):
                    stack.append(v)
    return out


def as_index(value: Any, default: int = 0) -> int | str:
    """A slot index from a provider's frame: ints and strings only (slots are dict keys)."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else default


def as_list(value: Any) -> list[Any]:
    """A JSON array, or [] for anything else (providers' fields are not always what they say)."""
    return value if isinstance(value, list) else []


def sum_ints(*values: int | None) -> int | None:
    """Sum of the values that are known; None when none is."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None
