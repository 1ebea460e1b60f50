"""OpenAI Responses API (also Azure and DeepSeek's Responses-compatible endpoints)."""

from __future__ import annotations

from typing import Any

from ..frames import Frame
from ..structure import tool_definitions
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
from .images import data_url_size, openai_image_tokens
from .openai import rendered_tools

# Event type -> kind of the text in its "delta".
_DELTAS = {
    "response.output_text.delta": CONTENT,
    "response.refusal.delta": CONTENT,
    "response.function_call_arguments.delta": TOOL,
    "response.custom_tool_call_input.delta": TOOL,
    "response.mcp_call_arguments.delta": TOOL,
    "response.code_interpreter_call_code.delta": TOOL,
    "response.reasoning_summary_text.delta": REASONING,
    "response.reasoning_text.delta": REASONING,
    "response.audio.transcript.delta": CONTENT,
}
# Fields of input items the model reads (reasoning items' encrypted content is not text).
_ITEM_TEXT = frozenset({"text", "content", "role", "arguments", "output", "input", "summary"})
_VOLATILE = fl.volatile("sequence_number", "obfuscation")
# Output items that are a call by the model (their name is output, shown once, when added).
_CALLS = ("function_call", "custom_tool_call", "mcp_call")
_FINAL = ("response.completed", "response.incomplete", "response.failed", "response.done")


def usage_from(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = Usage(input=as_int(obj.get("input_tokens")), output=as_int(obj.get("output_tokens")),
              total=as_int(obj.get("total_tokens")))
    d = obj.get("input_tokens_details")
    if isinstance(d, dict):
        u.cached_input = as_int(d.get("cached_tokens"))
    d = obj.get("output_tokens_details")
    if isinstance(d, dict):
        u.reasoning = as_int(d.get("reasoning_tokens"))
    return None if u.empty() else u


def read_response(resp: dict[str, Any], sink: Sink) -> None:
    """A whole response object: model, status, error and usage."""
    model = resp.get("model")
    if isinstance(model, str) and model:
        sink.model(model)
    err = resp.get("error")
    if isinstance(err, dict) and err.get("message"):
        sink.error(str(err["message"]))
    status = resp.get("status")
    if isinstance(status, str) and status not in ("in_progress", "queued"):
        details = resp.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        sink.finish_reason(str(reason or status))
    usage = usage_from(resp.get("usage")) or Usage()
    tier = resp.get("service_tier")
    if isinstance(tier, str) and tier:
        usage.service_tier = tier
    calls = [item.get("type") for item in as_list(resp.get("output")) if isinstance(item, dict)]
    usage.server_tools = tool_calls(web_search=calls.count("web_search_call"),
                                    file_search=calls.count("file_search_call"))
    if not usage.empty() or usage.service_tier:
        sink.usage(usage)


class ResponsesStreamParser(JSONFrameParser):
    __slots__ = ()

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        kind = obj.get("type") or frame.event
        text_kind = _DELTAS.get(kind) if isinstance(kind, str) else None
        if text_kind is not None:
            delta = obj.get("delta")
            if isinstance(delta, str) and delta:
                slot = (as_index(obj.get("output_index"), 0),
                        as_index(obj.get("content_index"), 0), text_kind)
                self.sink.text(slot, text_kind, delta)
            return
        if kind == "response.output_item.added":
            item = obj.get("item")
            if isinstance(item, dict) and item.get("type") in _CALLS \
                    and isinstance(item.get("name"), str) and item["name"]:
                self.sink.text((as_index(obj.get("output_index"), 0), 0, TOOL, "name"), TOOL,
                               item["name"])
            return
        resp = obj.get("response")
        if isinstance(resp, dict):
            if kind in _FINAL or kind == "response.created":
                read_response(resp, self.sink)
            return
        if kind == "error":
            self.sink.error(str(obj.get("message") or obj.get("error") or "error event"))


def _images(item: Any, model: str | None) -> int:
    """input_image parts of an input message: OpenAI's image formula, when the size is known
    (base64 data) or the detail is low."""
    parts = item.get("content") if isinstance(item, dict) else None
    n = 0
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, dict) and part.get("type") == "input_image":
            url = part.get("image_url")
            size = data_url_size(url) if isinstance(url, str) else None
            detail = part.get("detail")
            n += openai_image_tokens(model, size, detail if isinstance(detail, str) else None) \
                or 0
    return n


class ResponsesDialect:
    name = "openai-responses"

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        return request_info(body)

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int:
        body = info.body
        if not isinstance(body, dict):
            return 0
        n = 0
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            n += tokenizer.count(instructions) + 3
        tools = tool_definitions(body)
        if tools:  # rendered as OpenAI renders chat tools
            system = [{"role": "system", "content": instructions}] \
                if isinstance(instructions, str) and instructions else []
            n += rendered_tools(system, [{"function": t} for t in tools], tokenizer)
        inp = body.get("input")
        if isinstance(inp, str):
            return n + tokenizer.count(inp) + 3 + 3
        if isinstance(inp, list):
            for item in inp:
                n += 3 + sum(tokenizer.count(t) for t in texts_of(item, _ITEM_TEXT))
                n += _images(item, info.model)
                if isinstance(item, dict) and item.get("type") in _CALLS \
                        and isinstance(item.get("name"), str):
                    n += tokenizer.count(item["name"])
            n += 3
        return n

    def stream_parser(self, sink: Sink) -> ResponsesStreamParser:
        return ResponsesStreamParser(sink)

    def fast_lane(self, parser: Any) -> fl.TemplateLane:
        """Text, reasoning and argument deltas (every text the reader takes is a "delta")."""
        return fl.TemplateLane(("delta",), _VOLATILE)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if not isinstance(obj, dict):
            return
        for i, item in enumerate(as_list(obj.get("output"))):
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "message":
                for j, part in enumerate(as_list(item.get("content"))):
                    if isinstance(part, dict):
                        text = part.get("text") or part.get("refusal")
                        if isinstance(text, str) and text:
                            sink.text((i, j, CONTENT), CONTENT, text)
            elif kind == "reasoning":
                for j, part in enumerate(as_list(item.get("summary"))):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        sink.text((i, j, REASONING), REASONING, part["text"])
            elif kind in _CALLS:
                if isinstance(item.get("name"), str) and item["name"]:
                    sink.text((i, 0, TOOL, "name"), TOOL, item["name"])
                args = item.get("arguments") or item.get("input")
                if isinstance(args, str) and args:
                    sink.text((i, 0, TOOL), TOOL, args)
        read_response(obj, sink)
