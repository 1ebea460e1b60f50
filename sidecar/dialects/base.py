"""What every provider dialect reads from a request and reports from a response (sans-IO)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

from ..frames import Frame
from ..tokens import Tokenizer


@dataclass(slots=True)
class Usage:
    """Provider-reported token counts. None means the provider did not say.

    ``input`` is all input tokens including cached ones; ``output`` includes reasoning;
    ``cached_input``, ``cache_write_input`` and ``reasoning`` are subsets.
    """

    input: int | None = None
    output: int | None = None
    cached_input: int | None = None
    cache_write_input: int | None = None
    reasoning: int | None = None
    total: int | None = None

    def merge(self, newer: Usage) -> None:
        """Later frames carry cumulative counts: each field the newer frame states replaces ours."""
        for f in fields(self):
            value = getattr(newer, f.name)
            if value is not None:
                setattr(self, f.name, value)

    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


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
    """What the sidecar learns from a request body before forwarding it."""

    model: str | None = None
    stream: bool = False
    body: Any = None  # the parsed JSON body, kept for prompt estimation


class StreamParser(Protocol):
    def on_frame(self, frame: Frame) -> None: ...


class Dialect(Protocol):
    name: str

    def parse_request(self, path: str, body: bytes) -> RequestInfo: ...

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int: ...

    def stream_parser(self, sink: Sink) -> StreamParser: ...

    def parse_body(self, obj: Any, sink: Sink) -> None: ...


def as_int(value: Any) -> int | None:
    """A token count from JSON: ints (and integral floats) pass, anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
