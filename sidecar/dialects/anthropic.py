"""Anthropic Messages API, streaming and not.

Anthropic's ``input_tokens`` excludes cache reads and writes; in our semantics ``input`` is all
input, so input = input_tokens + cache_read_input_tokens + cache_creation_input_tokens, with
``cached_input`` = cache reads and ``cache_write_input`` = cache creation. ``message_start``
carries input counts; ``message_delta`` carries cumulative output and may restate input counts:
fields are merged as they arrive (never summed), then normalized.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..frames import Frame
from ..tokens import Tokenizer
from . import fastlane as fl
from .base import (
    CONTENT,
    REASONING,
    TOOL,
    JSONFrameParser,
    RequestInfo,
    Sink,
    Usage,
    as_index,
    as_int,
    as_list,
    request_info,
    texts_of,
    tool_calls,
)
from .images import anthropic_image_tokens, data_url_size


def normalize(raw: dict[str, Any]) -> Usage:
    inp = raw.get("input_tokens")
    read = raw.get("cache_read_input_tokens")
    write = raw.get("cache_creation_input_tokens")
    total_in = None if inp is None else inp + (read or 0) + (write or 0)
    tier = raw.get("service_tier")
    return Usage(input=total_in, output=raw.get("output_tokens"), cached_input=read,
                 cache_write_input=write, cache_write_1h_input=raw.get("cache_1h"),
                 server_tools=tool_calls(web_search=raw.get("web_search_requests"),
                                         web_fetch=raw.get("web_fetch_requests")),
                 service_tier=tier if tier in ("priority", "batch") else None)


def _counts(usage: dict[str, Any]) -> dict[str, int]:
    """One usage object's counts, the 1-hour cache writes and server tool calls flattened."""
    out: dict[str, int] = {}
    for key in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens"):
        v = as_int(usage.get(key))
        if v is not None:
            out[key] = v
    cc = usage.get("cache_creation")
    if isinstance(cc, dict) and (v := as_int(cc.get("ephemeral_1h_input_tokens"))) is not None:
        out["cache_1h"] = v
    st = usage.get("server_tool_use")
    if isinstance(st, dict):
        for key in ("web_search_requests", "web_fetch_requests"):
            if (v := as_int(st.get(key))) is not None:
                out[key] = v
    return out


def merge_raw(raw: dict[str, Any], usage: Any) -> bool:
    """Fold one usage object into the running raw counts. With ``iterations`` (server-side
    compaction, tool loops) the top level is only the last iteration: the bill is their sum."""
    if not isinstance(usage, dict):
        return False
    counts = _counts(usage)
    iterations = [it for it in as_list(usage.get("iterations")) if isinstance(it, dict)]
    if iterations:
        summed: dict[str, int] = {}
        for it in iterations:
            for key, v in _counts(it).items():
                summed[key] = summed.get(key, 0) + v
        counts.update(summed)
    if isinstance(usage.get("service_tier"), str):
        raw["service_tier"] = usage["service_tier"]
    raw.update(counts)
    return bool(counts)


_DELTA_FIELDS = {"text_delta": ("text", CONTENT), "thinking_delta": ("thinking", REASONING),
                 "input_json_delta": ("partial_json", TOOL),
                 "citations_delta": ("", CONTENT)}


class AnthropicStreamParser(JSONFrameParser):
    __slots__ = ("_raw",)

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self._raw: dict[str, Any] = {}

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        kind = obj.get("type") or frame.event
        sink = self.sink
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                field, text_kind = _DELTA_FIELDS.get(str(delta.get("type")), ("", ""))
                text = delta.get(field) if field else None
                if isinstance(text, str) and text:
                    sink.text((as_index(obj.get("index"), 0),), text_kind, text)
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict):
                if block.get("type") in ("tool_use", "server_tool_use") and block.get("name"):
                    sink.text((as_index(obj.get("index"), 0), "name"), TOOL, str(block["name"]))
                text = block.get("text")
                if isinstance(text, str) and text:
                    sink.text((as_index(obj.get("index"), 0),), CONTENT, text)
        elif kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                if isinstance(msg.get("model"), str):
                    sink.model(msg["model"])
                if merge_raw(self._raw, msg.get("usage")):
                    sink.usage(normalize(self._raw))
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                sink.finish_reason(delta["stop_reason"])
            if merge_raw(self._raw, obj.get("usage")):
                sink.usage(normalize(self._raw))
        elif kind == "error":
            err = obj.get("error")
            sink.error(str(err.get("message") if isinstance(err, dict) else err))


def _image_tokens(source: Any) -> int:
    """Anthropic's published image formula for base64 sources (URL images: size unknown)."""
    if not isinstance(source, dict) or source.get("type") != "base64":
        return 0
    data = source.get("data")
    if not isinstance(data, str):
        return 0
    size = data_url_size(f"data:{source.get('media_type', 'image/png')};base64,{data[:4096]}")
    return anthropic_image_tokens(size) or 0


class AnthropicDialect:
    name = "anthropic"

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        return request_info(body)

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int:
        body = info.body
        if not isinstance(body, dict):
            return 0
        keys = frozenset({"text", "content", "thinking", "input"})
        n = sum(tokenizer.count(t) for t in texts_of(body.get("system"), keys))
        for msg in body.get("messages") or []:
            n += 4 + sum(tokenizer.count(t) for t in texts_of(msg, keys))
            parts = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(parts, list):
                for part in parts:
                    if isinstance(part, dict) and part.get("type") == "tool_use":
                        n += tokenizer.count(orjson.dumps(part.get("input")).decode())
                    elif isinstance(part, dict) and part.get("type") == "image":
                        n += _image_tokens(part.get("source"))
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            n += tokenizer.count(orjson.dumps(tools).decode())
        return n + 3

    def stream_parser(self, sink: Sink) -> AnthropicStreamParser:
        return AnthropicStreamParser(sink)

    def fast_lane(self, parser: Any) -> fl.TemplateLane:
        """content_block_delta events: text, thinking and tool-input JSON."""
        return fl.TemplateLane(("text", "thinking", "partial_json", "name"), fl.PADDING)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if not isinstance(obj, dict):
            return
        if obj.get("type") == "error":
            err = obj.get("error")
            sink.error(str(err.get("message") if isinstance(err, dict) else err))
            return
        if isinstance(obj.get("model"), str):
            sink.model(obj["model"])
        for i, block in enumerate(as_list(obj.get("content"))):
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                sink.text((i,), CONTENT, block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                sink.text((i,), REASONING, block["thinking"])
            elif kind in ("tool_use", "server_tool_use"):
                sink.text((i,), TOOL, orjson.dumps(block.get("input")).decode())
        if isinstance(obj.get("stop_reason"), str):
            sink.finish_reason(obj["stop_reason"])
        raw: dict[str, Any] = {}
        if merge_raw(raw, obj.get("usage")):
            sink.usage(normalize(raw))
