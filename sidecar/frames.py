"""Sans-IO decoders that turn a byte stream into frames: SSE (WHATWG event-stream) and NDJSON.

Bytes go in with ``feed()`` in any split (mid-line, mid-UTF-8 character); complete frames come
out. No sockets, no asyncio. Errors never raise: they come out as ``FrameError`` items in the
same list, so the caller can count them while the stream passes untouched.
"""

from __future__ import annotations

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
            self._event = value.decode("utf-8", "replace")
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


Decoder = SSEDecoder | NDJSONDecoder


def decoder_for(content_type: str | None, max_frame_size: int = MAX_FRAME_SIZE) -> Decoder | None:
    """The decoder for a response content type, or None for a plain (non-streamed) body."""
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct == "text/event-stream":
        return SSEDecoder(max_frame_size)
    if ct in ("application/x-ndjson", "application/ndjson", "application/jsonl",
              "application/jsonlines", "application/x-jsonlines"):
        return NDJSONDecoder(max_frame_size)
    return None
