"""Opt-in include_usage injection for OpenAI-format streams, sans-IO.

The one deliberate exception to byte transparency: when a route enables it and the client did not
ask for usage, the request gains ``stream_options.include_usage`` and the extra usage-only chunk
(``"choices": []`` with ``usage``) is removed from what the client receives. Every other byte
passes unchanged. The meter still sees the usage chunk, so the request settles as reported.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def inject(body: Any) -> bytes | None:
    """The new request body, or None when nothing needs changing."""
    if not isinstance(body, dict) or body.get("stream") is not True:
        return None
    if "messages" not in body and "prompt" not in body:
        return None
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        return None
    new_opts = dict(opts) if isinstance(opts, dict) else {}
    new_opts["include_usage"] = True
    return orjson.dumps({**body, "stream_options": new_opts})


def _is_usage_only(event: bytes) -> bool:
    for line in event.splitlines():
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if not payload.startswith(b"{") or b'"usage"' not in payload:
                return False
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return False
            return isinstance(obj, dict) and obj.get("choices") == [] and bool(obj.get("usage"))
    return False


class UsageChunkFilter:
    """Passes SSE bytes through event by event, minus usage-only chunks."""

    __slots__ = ("_buf", "removed")

    def __init__(self) -> None:
        self._buf = b""
        self.removed = 0

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf + chunk
        out = []
        pos = 0
        for m in _EVENT_END.finditer(buf):
            event = buf[pos:m.end()]
            pos = m.end()
            if _is_usage_only(event):
                self.removed += 1
            else:
                out.append(event)
        self._buf = buf[pos:]
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._buf = self._buf, b""
        if rest and _is_usage_only(rest):
            self.removed += 1
            return b""
        return rest
