"""Sans-IO decoders that turn a byte stream into frames: SSE (WHATWG event-stream) and NDJSON.

Bytes go in with ``feed()`` in any split (mid-line, mid-UTF-8 character); complete frames come
out. No sockets, no asyncio. Errors never raise: they come out as ``FrameError`` items in the
same list, so the caller can count them while the stream passes untouched.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

# A frame larger than this is dropped (and reported) instead of buffered: one runaway event must
# not hold unbounded memory in a proxy that serves thousands of streams. 8 MiB is well above any
# real provider event (the largest seen are multi-MB tool-call arguments in a single frame).
MAX_FRAME_SIZE = 8 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class Frame:
    """One dispatched event. ``data`` is the joined ``data:`` lines as bytes (None if none)."""

    data: bytes | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    # Non-standard fields (Zhipu v3's ``meta:``) kept for the dialects; values joined with "\n".
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class FrameError:
    """A frame that could not be decoded; the bytes still reached the client."""

    reason: str


Item = Frame | FrameError


class SSEDecoder:
    """Incremental WHATWG event-stream parser.

    Deviation from the spec, on purpose: at ``close()`` a pending event that was never terminated
    by a blank line is still dispatched, because real streams end with ``data: [DONE]`` and no
    blank line, and usage may sit in that last frame.
    """

    __slots__ = (
        "_buf",
        "_data",
        "_dropping",
        "_event",
        "_fields",
        "_id",
        "_max",
        "_retry",
        "_seen_start",
        "_size",
        "_skip_lf",
    )

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buf = b""
        self._skip_lf = False
        self._seen_start = False
        self._dropping = False
        self._reset()

    def _reset(self) -> None:
        self._data: list[bytes] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._fields: dict[str, str] = {}
        self._size = 0

    def feed(self, chunk: bytes) -> list[Item]:
        out: list[Item] = []
        if not chunk:
            return out
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if (not self._buf and self._seen_start and not self._dropping and not self._data
                and self._event is None and not self._fields and b"\r" not in chunk):
            chunk = self._fast(chunk, out)
            if not chunk:
                return out
        buf = self._buf + chunk if self._buf else chunk
        if not self._seen_start:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._buf = buf
                return out
            self._seen_start = True
            if buf.startswith(_BOM):
                buf = buf[3:]
        pos = 0
        n = len(buf)
        find = buf.find
        while pos < n:
            lf = find(b"\n", pos)
            cr = find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                end = cr
                nxt = cr + 1
                if nxt < n:
                    if buf[nxt] == 0x0A:
                        nxt += 1
                else:
                    self._skip_lf = True
            elif lf >= 0:
                end = lf
                nxt = lf + 1
            else:
                break
            self._line(buf[pos:end], out)
            pos = nxt
        rest = buf[pos:]
        if len(rest) > self._max:
            # A line with no end in sight: drop it, and the frame it belongs to.
            if not self._dropping:
                out.append(FrameError("frame exceeds the size limit"))
            self._dropping = True
            self._reset()
            rest = b""
        self._buf = rest
        return out

    def _fast(self, chunk: bytes, out: list[Item]) -> bytes:
        """Whole one-line ``data:`` events at the start of ``chunk``, the common case, without
        the line-by-line state machine. Returns what is left for it (from the first event that
        is not that simple)."""
        pos = 0
        n = len(chunk)
        limit = self._max
        while pos < n:
            end = chunk.find(b"\n\n", pos)
            if end < 0 or chunk[pos:pos + 6] != b"data: ":
                break
            if chunk.find(b"\n", pos, end) >= 0 or end - pos - 6 > limit:
                break
            out.append(Frame(data=chunk[pos + 6:end]))
            pos = end + 2
        return chunk[pos:] if pos else chunk

    def idle(self) -> bool:
        """Between events with nothing buffered: a fast lane may take whole events from here
        (what it leaves goes to feed(), which starts from this same state)."""
        return (self._seen_start and not self._buf and not self._skip_lf and not self._dropping
                and not self._data and self._event is None and not self._fields)

    def pending_end(self, chunk: bytes) -> int:
        """Where in ``chunk`` the event being assembled ends (just after its blank line), when
        that is plain to see; 0 otherwise. Feeding ``chunk[:n]`` then leaves the decoder idle."""
        if self._skip_lf or self._dropping:
            return 0
        if not self._buf and chunk[:1] == b"\n":
            return 1
        i = chunk.find(b"\n\n")
        if i < 0 or b"\r" in chunk[:i] or b"\r" in self._buf:
            return 0
        return i + 2

    def at_boundary(self) -> bool:
        """Between events: nothing of a next event has arrived yet."""
        return not self._buf and not self._skip_lf and not (
            self._data or self._event is not None or self._fields or self._id is not None)

    def close(self) -> list[Item]:
        """End of stream: flush a final unterminated line and dispatch a pending event."""
        out: list[Item] = []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._skip_lf = False
        self._dispatch(out)
        return out

    def _line(self, line: bytes, out: list[Item]) -> None:
        if not line:
            self._dispatch(out)
            return
        if self._dropping:
            return
        if line[0] == 0x3A:  # ":" comment
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        self._size += len(value)
        if self._size > self._max:
            out.append(FrameError("frame exceeds the size limit"))
            self._dropping = True
            self._reset()
            return
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace") or None  # "" is the default
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():
                self._retry = int(value)
        else:
            key = name.decode("utf-8", "replace")
            text = value.decode("utf-8", "replace")
            prev = self._fields.get(key)
            self._fields[key] = text if prev is None else prev + "\n" + text

    def _dispatch(self, out: list[Item]) -> None:
        if self._dropping:
            self._dropping = False
            self._reset()
            return
        if self._data or self._event is not None or self._fields:
            data = b"\n".join(self._data) if self._data else None
            out.append(Frame(data, self._event, self._id, self._retry, self._fields))
        elif self._id is not None or self._retry is not None:
            pass  # id/retry-only blocks carry no payload for accounting
        self._reset()


class NDJSONDecoder:
    """Incremental newline-delimited JSON splitter (Ollama). Each non-blank line is one frame."""

    __slots__ = ("_buf", "_dropping", "_max")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buf = b""
        self._dropping = False

    def feed(self, chunk: bytes) -> list[Item]:
        out: list[Item] = []
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            if self._dropping:
                self._dropping = False
                continue
            self._emit(line, out)
        if len(self._buf) > self._max:
            if not self._dropping:
                out.append(FrameError("frame exceeds the size limit"))
            self._dropping = True
            self._buf = b""
        return out

    def at_boundary(self) -> bool:
        return not self._buf

    def close(self) -> list[Item]:
        out: list[Item] = []
        if self._buf and not self._dropping:
            self._emit(self._buf, out)
        self._buf = b""
        self._dropping = False
        return out

    @staticmethod
    def _emit(line: bytes, out: list[Item]) -> None:
        line = line.strip()
        if line:
            out.append(Frame(data=line))


class JSONArrayDecoder:
    """Incremental splitter for a streamed top-level JSON array (Gemini without ``alt=sse``).

    Emits each top-level element's bytes as a frame as soon as its closing brace arrives. Tracks
    only nesting depth and string/escape state, so the cost is one pass over the bytes.
    """

    __slots__ = ("_buf", "_depth", "_dropping", "_escape", "_in_str", "_max", "_scan", "_start",
                 "_started")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buf = b""
        self._scan = 0  # bytes of _buf already scanned
        self._start = -1  # where the current element starts in _buf
        self._depth = 0
        self._in_str = False
        self._escape = False
        self._started = False  # seen the opening "["
        self._dropping = False

    def feed(self, chunk: bytes) -> list[Item]:
        out: list[Item] = []
        buf = self._buf + chunk
        i = self._scan
        n = len(buf)
        depth, in_str, escape, start = self._depth, self._in_str, self._escape, self._start
        while i < n:
            c = buf[i]
            if in_str:
                if escape:
                    escape = False
                elif c == 0x5C:  # backslash
                    escape = True
                elif c == 0x22:
                    in_str = False
            elif c == 0x22:
                in_str = True  # bare strings or numbers as elements carry no usage: skipped
            elif c in (0x7B, 0x5B):  # { [
                if not self._started and c == 0x5B:
                    self._started = True
                    depth = 1
                else:
                    if depth == 1 and start < 0:
                        start = i
                    depth += 1
            elif c in (0x7D, 0x5D):  # } ]
                depth -= 1
                if depth == 1 and start >= 0:
                    if self._dropping:
                        self._dropping = False
                    else:
                        out.append(Frame(data=buf[start:i + 1]))
                    start = -1
                elif depth <= 0:
                    depth = 0
                    self._started = False
            i += 1
        # Keep only the unfinished element; everything before it is done with.
        keep = start if start >= 0 else n
        self._buf = buf[keep:]
        self._scan = n - keep
        self._start = 0 if start >= 0 else -1
        self._depth, self._in_str, self._escape = depth, in_str, escape
        if len(self._buf) > self._max:
            if not self._dropping:
                out.append(FrameError("frame exceeds the size limit"))
            self._dropping = True
            self._buf = b""
            self._scan = 0
            self._start = 0
        return out

    def close(self) -> list[Item]:
        if self._buf.strip() and self._start >= 0 and not self._dropping:
            return [FrameError("stream ended inside a JSON element")]
        return []


class EventStreamDecoder:
    """AWS binary event-stream (Bedrock ConverseStream): length-prefixed messages with headers.

    Each message: total length (4), headers length (4), prelude CRC (4), headers, payload,
    message CRC (4). ``event`` is the ``:event-type`` (or ``:exception-type``) header.
    """

    __slots__ = ("_broken", "_buf", "_max")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max = max_frame_size
        self._buf = b""
        self._broken = False  # framing lost: nothing after it can be trusted

    def feed(self, chunk: bytes) -> list[Item]:
        out: list[Item] = []
        if self._broken:
            return out
        buf = self._buf + chunk
        pos = 0
        while len(buf) - pos >= 12:
            total = int.from_bytes(buf[pos:pos + 4], "big")
            hlen = int.from_bytes(buf[pos + 4:pos + 8], "big")
            if total < 16 or hlen > total - 16 or total > self._max:
                out.append(FrameError("invalid event-stream prelude"))
                self._broken = True
                pos = len(buf)
                break
            if zlib.crc32(buf[pos:pos + 8]) != int.from_bytes(buf[pos + 8:pos + 12], "big"):
                out.append(FrameError("event-stream prelude CRC mismatch"))
                self._broken = True
                pos = len(buf)
                break
            if len(buf) - pos < total:
                break
            msg = buf[pos:pos + total]
            pos += total
            if zlib.crc32(msg[:-4]) != int.from_bytes(msg[-4:], "big"):
                out.append(FrameError("event-stream message CRC mismatch"))
                continue
            headers = _eventstream_headers(msg[12:12 + hlen])
            if headers is None:
                out.append(FrameError("invalid event-stream headers"))
                continue
            event = headers.get(":event-type") or headers.get(":exception-type")
            out.append(Frame(data=msg[12 + hlen:-4], event=event, fields=headers))
        self._buf = buf[pos:]
        return out

    def close(self) -> list[Item]:
        if self._buf:
            self._buf = b""
            return [FrameError("stream ended inside an event-stream message")]
        return []


def _eventstream_headers(raw: bytes) -> dict[str, str] | None:
    """Header name -> value for string headers (type 7); other types are skipped by size."""
    out: dict[str, str] = {}
    i = 0
    sizes = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
    try:
        while i < len(raw):
            nlen = raw[i]
            name = raw[i + 1:i + 1 + nlen].decode("utf-8", "replace")
            i += 1 + nlen
            kind = raw[i]
            i += 1
            if kind in (6, 7):
                vlen = int.from_bytes(raw[i:i + 2], "big")
                if kind == 7:
                    out[name] = raw[i + 2:i + 2 + vlen].decode("utf-8", "replace")
                i += 2 + vlen
            elif kind in sizes:
                i += sizes[kind]
            else:
                return None
    except IndexError:
        return None
    return out if i == len(raw) else None


Decoder = SSEDecoder | NDJSONDecoder | JSONArrayDecoder | EventStreamDecoder

_NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl",
                 "application/jsonlines", "application/x-jsonlines")
_STREAM_TYPES = frozenset(("text/event-stream", "application/vnd.amazon.eventstream",
                           *_NDJSON_TYPES))


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def streamed(content_type: str | None, *, json_stream: bool = False) -> bool:
    """Whether decoder_for gives this content type a decoder: the body is a stream of frames."""
    ct = _media_type(content_type)
    return ct in _STREAM_TYPES or (json_stream and ct in ("application/json", "text/plain", ""))


def decoder_for(content_type: str | None, max_frame_size: int = MAX_FRAME_SIZE, *,
                json_stream: bool = False) -> Decoder | None:
    """The decoder for a response content type, or None for a plain (non-streamed) body.

    ``json_stream``: the dialect knows this JSON response is a streamed array of chunks.
    """
    ct = _media_type(content_type)
    if ct == "text/event-stream":
        return SSEDecoder(max_frame_size)
    if ct in _NDJSON_TYPES:
        return NDJSONDecoder(max_frame_size)
    if ct == "application/vnd.amazon.eventstream":
        return EventStreamDecoder(max_frame_size)
    if json_stream and ct in ("application/json", "text/plain", ""):
        return JSONArrayDecoder(max_frame_size)
    return None
