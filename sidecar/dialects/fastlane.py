"""A dialect's fast lane: whole upstream reads of the events that carry almost all tokens, read
with a handful of C calls per read instead of a JSON parse and a dict walk per event.

The lane learns from the general path. When the general reader handles an SSE event that gives
exactly one text and nothing else (no model change, usage, finish reason, error), the event's
bytes are split around the JSON string that held the text: a head and a tail. Later events that
are byte for byte that head, any JSON string, and that tail have the same structure, so the
general reader would give them the same meaning with the new string. A read made only of such
events is then checked and read at once:

- the events are split with one ``bytes.split`` on tail + blank line + head;
- the strings are decoded by one ``orjson.loads`` of ``[s1,s2,...]``, which also proves that
  each piece is exactly one valid JSON string (any other piece gives a decoding error, another
  count of items, or an item that is not a string: the read then goes to the general path);
- fields that change on every event and that the reader ignores (``obfuscation`` padding,
  ``sequence_number``) are cut out first by one regular expression, only where their value is
  plain ASCII, number or string, so nothing they hide could be malformed.

What the lane takes is a prefix of whole events; whatever follows (a partial event, another
shape, a usage frame) goes to the general path, which is where its state continues. Templates
depend on the reader's state at learning time (OpenAI's current model): they are kept per state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

_native_scan_run: Callable[[bytes, bytes, bytes, tuple[bytes, ...], bool], tuple[int, str]] | None
try:  # the native core of the lane (sidecar/_lane.c); optional, same results
    from .._lane import scan_run as _native_scan_run
except ImportError:  # pragma: no cover - installs without a C compiler
    _native_scan_run = None

# Whether this install has the native core (built where a C compiler was present).
NATIVE = _native_scan_run is not None

# How many templates one response keeps per reader state, and how many events it may try to
# learn from before giving up (a format the lane cannot template costs nothing after that).
MAX_TEMPLATES = 4
MAX_LEARN_ATTEMPTS = 32

_PLAIN = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_NUMBER = rb"-?(?:0|[1-9][0-9]*)"
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\.)*"')


@dataclass(frozen=True, slots=True)
class Volatile:
    """What changes from event to event without meaning anything to the reader, normalized
    away before events are compared with a template: ``pattern`` matches are replaced by
    ``replacement``, in reads that contain ``mark`` at all."""

    pattern: re.Pattern[bytes]
    mark: bytes
    replacement: bytes = b""
    # The same for the native core: the ``,"key":`` prefixes of the pairs, and whether it is
    # Anthropic's padding instead.
    keys: tuple[bytes, ...] = ()
    pad: bool = False


def volatile(*keys: str) -> Volatile:
    """``,"key":value`` pairs of keys that change every event and that the reader ignores
    (values: plain ASCII strings or integers only); the first key is the one every such event
    carries."""
    names = b"|".join(re.escape(k.encode()) for k in keys)
    return Volatile(re.compile(rb',"(?:' + names + rb')":(?:' + _PLAIN + rb"|" + _NUMBER + rb")"),
                    b'"' + keys[0].encode() + b'":',
                    keys=tuple(b',"' + k.encode() + b'":' for k in keys))


# Anthropic pads each event's JSON with a varying run of spaces before its last brace (JSON
# whitespace: no meaning).
PADDING = Volatile(re.compile(rb"\} +\}\n\n"), b"} ", b"}}\n\n", pad=True)


@dataclass(frozen=True, slots=True)
class Template:
    head: bytes  # event bytes before the text's JSON string
    tail: bytes  # after it, blank line included
    sep: bytes  # tail + head: what lies between two texts in a run of such events
    slot: Any
    kind: str


class TemplateLane:
    """The fast lane of one response."""

    __slots__ = ("_attempts", "_key", "_native_keys", "_native_pad", "_state", "_templates",
                 "_text_keys", "_vol", "_vol_mark", "_vol_with")

    def __init__(self, text_keys: tuple[str, ...], volatile_keys: Volatile | None,
                 state: Callable[[], Any] = lambda: None) -> None:
        self._key = _key_pattern(text_keys)
        self._text_keys = text_keys
        self._vol = volatile_keys.pattern if volatile_keys else None
        self._vol_mark = volatile_keys.mark if volatile_keys else b""
        self._vol_with = volatile_keys.replacement if volatile_keys else b""
        self._native_keys = volatile_keys.keys if volatile_keys else ()
        self._native_pad = volatile_keys.pad if volatile_keys else False
        self._state = state
        self._templates: dict[Any, list[Template]] = {}
        self._attempts = 0

    @property
    def learning(self) -> bool:
        """Still watching the general path (bounded: a format it cannot template costs
        nothing after a few dozen events)."""
        return self._attempts < MAX_LEARN_ATTEMPTS

    def watched(self) -> None:
        self._attempts += 1


    def learn(self, raw: bytes, slot: Any, kind: str, text: str) -> None:
        """The general path read ``raw`` (one whole event) as exactly one ``text`` in ``slot``
        and nothing else: remember its shape."""
        if self._vol is not None:
            raw = self._vol.sub(self._vol_with, raw)
        found = list(self._key.finditer(raw))
        if len(found) != 1:
            return  # no text key, or two (precedence between them is the reader's business)
        m = found[0]
        try:
            if orjson.loads(m.group(1)) != text:
                return
        except orjson.JSONDecodeError:
            return
        head, tail = raw[:m.start(1)], raw[m.end(1):]
        if not tail.endswith(b"\n\n") or b"\n\n" in head or b"\n\n" in tail[:-2]:
            return
        templates = self._templates.setdefault(self._state(), [])
        if len(templates) >= MAX_TEMPLATES or any(
                t.head == head and t.tail == tail for t in templates):
            return
        templates.append(Template(head, tail, tail + head, slot, kind))

    def scan(self, data: bytes) -> tuple[int, Template | None, list[str]]:
        """(bytes taken from the start of ``data``, the template they matched, their texts)
        for the longest run of whole events of one known template there; (0, None, [])
        when the first event is not one."""
        templates = self._templates.get(self._state())
        if not templates:
            return _MISS
        if _scan_run is not None:
            for t in templates:
                end, text = _scan_run(data, t.head, t.tail, self._native_keys, self._native_pad)
                if end:
                    return end, t, [text]
            # Nothing it could take: the reading below decides (another shape, or one of the
            # rare cases the native core leaves to it).
        cut = data.rfind(b"\n\n") + 2
        if cut < 2:
            return _MISS
        region = data if cut == len(data) else data[:cut]
        vol = self._vol
        subbed = vol is not None and self._vol_mark in region
        if subbed:
            assert vol is not None
            region = vol.sub(self._vol_with, region)
        for t in templates:
            head, tail = t.head, t.tail
            if not region.startswith(head):
                continue
            lh, lt, sep = len(head), len(tail), t.sep
            try:
                if region.endswith(tail) and len(region) > lh + lt:
                    # The whole read may be one run: one split and one decode.
                    texts = read_run(region, t)
                    if texts is not None:
                        return cut, t, texts
                elif not subbed:
                    # A run, then other events (a stream's first or last read). The last
                    # piece holds the run's last text, if its event is one of ours, then the
                    # rest. (Where volatile pairs were cut out, positions do not map back to
                    # the read: _prefix goes event by event instead.)
                    pieces = region[lh:].split(sep)
                    last = pieces.pop()
                    m = _STRING.match(last)
                    if m is not None and last.startswith(tail, m.end()):
                        pieces.append(last[:m.end()])
                        end = len(region) - len(last) + m.end() + lt
                    else:
                        end = len(region) - len(last) - lh
                    if pieces:
                        texts = orjson.loads(b"[" + b",".join(pieces) + b"]")
                        if len(texts) == len(pieces) and set(map(type, texts)) <= _STR:
                            return end, t, texts
            except orjson.JSONDecodeError:
                pass
            return self._prefix(data, t)
        return _MISS

    def _prefix(self, data: bytes, t: Template) -> tuple[int, Template | None, list[str]]:
        """The run of the template's events at the start of ``data``, event by event (a read
        that also holds other events: the first of a stream, a finish or usage frame)."""
        vol, mark = self._vol, self._vol_mark
        head, tail = t.head, t.tail
        lh, lt = len(head), len(tail)
        pos = 0
        spans: list[bytes] = []
        while True:
            end = data.find(b"\n\n", pos) + 2
            if end < 2:
                break
            ev = data[pos:end]
            if vol is not None and mark in ev:
                ev = vol.sub(self._vol_with, ev)
            if len(ev) <= lh + lt or not ev.startswith(head) or not ev.endswith(tail):
                break
            spans.append(ev[lh:len(ev) - lt])
            pos = end
        if not spans:
            return _MISS
        try:
            texts = orjson.loads(b"[" + b",".join(spans) + b"]")
        except orjson.JSONDecodeError:
            return _MISS
        if len(texts) != len(spans) or not set(map(type, texts)) <= _STR:
            return _MISS
        return pos, t, texts

    def knows(self, data: bytes) -> bool:
        """Whether ``data`` starts like an event of a known template (worth a scan)."""
        templates = self._templates.get(self._state())
        if not templates:
            return False
        if self._vol is not None:
            end = data.find(b"\n\n") + 2
            first = data[:end] if end >= 2 else data
            if self._vol_mark in first:
                data = self._vol.sub(self._vol_with, first)
        return any(data.startswith(t.head) for t in templates)


@functools.lru_cache(maxsize=64)
def _key_pattern(text_keys: tuple[str, ...]) -> re.Pattern[bytes]:
    """The pattern that finds a text key's JSON string in an event (one per dialect: building
    it per response cost more than the rest of a lane's setup)."""
    return re.compile(rb'"(?:' + b"|".join(re.escape(k.encode()) for k in text_keys)
                      + rb')":\s*("(?:[^"\\\x00-\x1f]|\\.)*")')


_MISS: tuple[int, None, list[str]] = (0, None, [])
_STR = {str}
# What scan() tries first: the native core where it was built, else nothing (the Python
# reading gives the same texts). Tests switch it with use_native().
_scan_run = _native_scan_run


def use_native(on: bool) -> bool:
    """Read runs with the native core (where built) or in Python only; returns whether the
    native core was in use before."""
    global _scan_run
    was = _scan_run is not None
    _scan_run = _native_scan_run if on else None
    return was


def read_run(region: bytes, t: Template) -> list[str] | None:
    """The texts of ``region`` when it is wholly a run of ``t``'s events (head, one JSON string,
    tail; at least one), else None: one ``bytes.split`` and one ``orjson.loads``."""
    head, tail, sep = t.head, t.tail, t.sep
    lh, lt = len(head), len(tail)
    if len(region) <= lh + lt or not region.startswith(head) or not region.endswith(tail):
        return None
    body = region[lh:len(region) - lt]
    try:
        if sep not in body:  # one event: the common case when streams are paced
            text = orjson.loads(body)
            return [text] if type(text) is str else None
        pieces = body.split(sep)
        texts = orjson.loads(b"[" + b",".join(pieces) + b"]")
    except orjson.JSONDecodeError:
        return None
    return texts if len(texts) == len(pieces) and set(map(type, texts)) <= _STR else None


def raw_event(data: bytes, event: str | None) -> bytes:
    """The canonical bytes of an SSE event the decoder dispatched (the form the lane matches)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
