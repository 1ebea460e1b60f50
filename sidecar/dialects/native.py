"""Native formats of providers with simple JSON frames: Ollama, Baidu ERNIE, Qwen DashScope,
Zhipu GLM v3, Cohere v2 and AWS Bedrock Converse. Each normalizes usage to our semantics.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import orjson

from ..frames import Frame
from ..tokens import Tokenizer
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
    sum_ints,
    texts_of,
)
from .openai import message_parts

_TEXT_KEYS = frozenset({"text", "content", "prompt", "system", "input"})


def _count_texts(node: Any, tokenizer: Tokenizer, per_message: int = 3) -> int:
    """A generic prompt estimate: the text fields, plus framing per message."""
    if not isinstance(node, dict):
        return 0
    n = 0
    for key in ("messages", "contents", "prompt", "input", "system", "parameters",
                "toolConfig"):
        value = node.get(key)
        if isinstance(value, str):
            n += tokenizer.count(value)
        elif isinstance(value, list):
            for item in value:
                n += per_message + sum(tokenizer.count(t) for t in texts_of(item, _TEXT_KEYS))
        elif isinstance(value, dict):
            n += _count_texts(value, tokenizer, per_message)
    for key in ("tools", "functions"):  # definitions: names, descriptions and schemas
        value = node.get(key)
        if isinstance(value, list) and value:
            n += tokenizer.count(orjson.dumps(value).decode())
    return n


class _SimpleDialect:
    """Shared request parsing: model and stream flag from the body (and path)."""

    name = "simple"
    model_in_path: re.Pattern[str] | None = None
    stream_default = False

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        m = self.model_in_path.search(path) if self.model_in_path is not None else None
        return request_info(body, model=unquote(m.group(1)) if m else None,
                            stream=self.stream_default)

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int:
        return _count_texts(info.body, tokenizer)


# -- Ollama -------------------------------------------------------------------------------------


def _ollama(obj: dict[str, Any], sink: Sink) -> None:
    if isinstance(obj.get("model"), str):
        sink.model(obj["model"])
    if obj.get("error"):
        sink.error(str(obj["error"]))
    msg = obj.get("message")
    if isinstance(msg, dict):
        message_parts(0, msg, sink)
    for key, kind in (("response", CONTENT), ("thinking", REASONING)):
        text = obj.get(key)
        if isinstance(text, str) and text:
            sink.text((0, kind), kind, text)
    if obj.get("done") is True or "prompt_eval_count" in obj or "eval_count" in obj:
        if isinstance(obj.get("done_reason"), str):
            sink.finish_reason(obj["done_reason"])
        u = Usage(input=as_int(obj.get("prompt_eval_count")),
                  output=as_int(obj.get("eval_count")))
        if "embeddings" in obj or "embedding" in obj:
            u.output = 0
        if not u.empty():
            sink.usage(u)


class _OllamaParser(JSONFrameParser):
    __slots__ = ()

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        _ollama(obj, self.sink)


class OllamaDialect(_SimpleDialect):
    """Ollama /api/chat, /api/generate, /api/embed (NDJSON; streams unless stream is false)."""

    name = "ollama"
    stream_default = True

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        info = super().parse_request(path, query, body)
        info.embeddings = "/api/embed" in path
        if info.embeddings:
            info.stream = False
        return info

    def stream_parser(self, sink: Sink) -> _OllamaParser:
        return _OllamaParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if isinstance(obj, dict):
            _ollama(obj, sink)


# -- Baidu ERNIE ----------------------------------------------------------------------------------


def _ernie(obj: dict[str, Any], sink: Sink) -> None:
    if obj.get("error_code"):
        sink.error(f"{obj.get('error_code')}: {obj.get('error_msg')}")
    text = obj.get("result")
    if isinstance(text, str) and text:
        sink.text((0, CONTENT), CONTENT, text)
    fc = obj.get("function_call")
    if isinstance(fc, dict):
        for key in ("name", "arguments", "thoughts"):
            if isinstance(fc.get(key), str) and fc[key]:
                sink.text((0, TOOL, key), TOOL, fc[key])
    if obj.get("is_end") is True and isinstance(obj.get("finish_reason"), str):
        sink.finish_reason(obj["finish_reason"])
    u = obj.get("usage")
    if isinstance(u, dict):  # cumulative in every frame: each replaces the last
        usage = Usage(input=as_int(u.get("prompt_tokens")),
                      output=as_int(u.get("completion_tokens")),
                      total=as_int(u.get("total_tokens")))
        if not usage.empty():
            sink.usage(usage)


class _ErnieParser(JSONFrameParser):
    __slots__ = ()

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        _ernie(obj, self.sink)


class ErnieDialect(_SimpleDialect):
    """Baidu Qianfan ERNIE (wenxinworkshop) chat: ``result``, ``is_end``, cumulative usage."""

    name = "ernie"
    model_in_path = re.compile(r"/wenxinworkshop/chat/([^/?]+)")

    def stream_parser(self, sink: Sink) -> _ErnieParser:
        return _ErnieParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if isinstance(obj, dict):
            _ernie(obj, sink)


# -- Qwen DashScope (native) ----------------------------------------------------------------------


class _DashScopeParser(JSONFrameParser):
    """Text may be incremental or cumulative (``incremental_output`` false): only the new suffix
    of a cumulative text is counted."""

    __slots__ = ("_seen",)

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self._seen: dict[tuple[Any, ...], str] = {}

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        read_dashscope(obj, self.sink, self._seen)


def read_dashscope(obj: dict[str, Any], sink: Sink, seen: dict[tuple[Any, ...], str]) -> None:
    if obj.get("code") and obj.get("message"):
        sink.error(f"{obj['code']}: {obj['message']}")
    out = obj.get("output")
    if isinstance(out, dict):
        texts: list[tuple[tuple[Any, ...], str, Any]] = [((0, CONTENT), CONTENT, out.get("text"))]
        for pos, choice in enumerate(as_list(out.get("choices"))):
            if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                msg = choice["message"]
                idx = as_index(choice.get("index"), pos)
                texts.append(((idx, CONTENT), CONTENT, msg.get("content")))
                texts.append(((idx, REASONING), REASONING, msg.get("reasoning_content")))
                for j, call in enumerate(as_list(msg.get("tool_calls"))):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        texts.append(((idx, TOOL, j), TOOL, fn.get("arguments")))
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason not in ("null", ""):
                    sink.finish_reason(reason)
        for slot, kind, text in texts:
            if not isinstance(text, str) or not text:
                continue
            prev = seen.get(slot, "")
            delta = text[len(prev):] if prev and text.startswith(prev) else text
            seen[slot] = text if text.startswith(prev) else prev + text
            if delta:
                sink.text(slot, kind, delta)
        reason = out.get("finish_reason")
        if isinstance(reason, str) and reason not in ("null", ""):
            sink.finish_reason(reason)
    u = obj.get("usage")
    if isinstance(u, dict):
        usage = Usage(input=as_int(u.get("input_tokens")), output=as_int(u.get("output_tokens")),
                      total=as_int(u.get("total_tokens")))
        pd = u.get("prompt_tokens_details")
        if isinstance(pd, dict):
            usage.cached_input = as_int(pd.get("cached_tokens"))
        od = u.get("output_tokens_details")
        if isinstance(od, dict):
            usage.reasoning = as_int(od.get("reasoning_tokens"))
        if not usage.empty():
            sink.usage(usage)


class DashScopeDialect(_SimpleDialect):
    """Alibaba DashScope native text generation (``output.text`` or ``output.choices``)."""

    name = "dashscope"

    def stream_parser(self, sink: Sink) -> _DashScopeParser:
        return _DashScopeParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if isinstance(obj, dict):
            read_dashscope(obj, sink, {})


# -- Zhipu GLM v3 --------------------------------------------------------------------------------


class _ZhipuV3Parser:
    """``event: add`` frames carry raw text; ``finish`` carries usage in its ``meta:`` field."""

    __slots__ = ("sink",)

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def on_frame(self, frame: Frame) -> None:
        event = frame.event or "add"
        text = frame.data.decode("utf-8", "replace") if frame.data else ""
        if event in ("add", "finish") and text:
            self.sink.text((0, CONTENT), CONTENT, text)
        if event in ("error", "interrupted"):
            self.sink.error(text or event)
        meta = frame.fields.get("meta")
        if meta:
            try:
                obj = orjson.loads(meta)
            except orjson.JSONDecodeError:
                self.sink.malformed("invalid JSON in meta field")
                return
            u = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(u, dict):
                self.sink.usage(Usage(input=as_int(u.get("prompt_tokens")),
                                      output=as_int(u.get("completion_tokens")),
                                      total=as_int(u.get("total_tokens"))))
        if event == "finish":
            self.sink.finish_reason("stop")


class ZhipuV3Dialect(_SimpleDialect):
    """Zhipu GLM v3 ``sse-invoke`` (v4 is OpenAI-compatible and uses the openai dialect)."""

    name = "zhipu-v3"
    model_in_path = re.compile(r"/model-api/([^/]+)/")

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        info = super().parse_request(path, query, body)
        info.stream = info.stream or path.endswith("/sse-invoke")
        return info

    def stream_parser(self, sink: Sink) -> _ZhipuV3Parser:
        return _ZhipuV3Parser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, dict):
            if isinstance(obj, dict) and obj.get("success") is False:
                sink.error(str(obj.get("msg")))
            return
        for choice in data.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("content"), str):
                sink.text((0, CONTENT), CONTENT, choice["content"])
        u = data.get("usage")
        if isinstance(u, dict):
            sink.usage(Usage(input=as_int(u.get("prompt_tokens")),
                             output=as_int(u.get("completion_tokens")),
                             total=as_int(u.get("total_tokens"))))


# -- Cohere v2 -----------------------------------------------------------------------------------


def cohere_usage(u: Any) -> Usage | None:
    """``tokens`` are what the model processed; ``billed_units`` (often fewer: cached and
    system-prompt tokens are not billed) are what the price applies to."""
    if not isinstance(u, dict):
        return None
    tokens = u.get("tokens")
    billed = u.get("billed_units")
    billed = billed if isinstance(billed, dict) else {}
    if not isinstance(tokens, dict):
        tokens = billed
    usage = Usage(input=as_int(tokens.get("input_tokens")),
                  output=as_int(tokens.get("output_tokens")),
                  cached_input=as_int(u.get("cached_tokens")),
                  billed_input=as_int(billed.get("input_tokens")),
                  billed_output=as_int(billed.get("output_tokens")))
    return None if usage.empty() else usage


class _CohereParser(JSONFrameParser):
    __slots__ = ()

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        kind = obj.get("type") or frame.event
        delta = obj.get("delta")
        msg = delta.get("message") if isinstance(delta, dict) else None
        if kind == "content-delta" and isinstance(msg, dict):
            content = msg.get("content")
            if isinstance(content, dict):
                for key, k in (("text", CONTENT), ("thinking", REASONING)):
                    if isinstance(content.get(key), str) and content[key]:
                        self.sink.text((as_index(obj.get("index"), 0), k), k, content[key])
        elif kind in ("tool-call-delta", "tool-call-start") and isinstance(msg, dict):
            calls = msg.get("tool_calls")
            fn = calls.get("function") if isinstance(calls, dict) else None
            if isinstance(fn, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str) and fn[key]:
                        self.sink.text((as_index(obj.get("index"), 0), TOOL, key), TOOL, fn[key])
        elif kind == "tool-plan-delta" and isinstance(msg, dict):
            if isinstance(msg.get("tool_plan"), str) and msg["tool_plan"]:
                self.sink.text(("plan",), CONTENT, msg["tool_plan"])
        elif kind == "message-end" and isinstance(delta, dict):
            if isinstance(delta.get("finish_reason"), str):
                self.sink.finish_reason(delta["finish_reason"])
            usage = cohere_usage(delta.get("usage"))
            if usage is not None:
                self.sink.usage(usage)
            if delta.get("error"):
                self.sink.error(str(delta["error"]))


class CohereDialect(_SimpleDialect):
    """Cohere v2 chat (``/v2/chat``)."""

    name = "cohere"

    def stream_parser(self, sink: Sink) -> _CohereParser:
        return _CohereParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if not isinstance(obj, dict):
            return
        msg = obj.get("message")
        if isinstance(msg, dict):
            for i, part in enumerate(as_list(msg.get("content"))):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    sink.text((i, CONTENT), CONTENT, part["text"])
            for j, call in enumerate(as_list(msg.get("tool_calls"))):
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    sink.text((j, TOOL), TOOL, fn["arguments"])
        if isinstance(obj.get("finish_reason"), str):
            sink.finish_reason(obj["finish_reason"])
        usage = cohere_usage(obj.get("usage"))
        if usage is not None:
            sink.usage(usage)


# -- AWS Bedrock Converse -------------------------------------------------------------------------


def bedrock_usage(u: Any) -> Usage | None:
    """Bedrock's inputTokens exclude cache reads and writes; input here includes them."""
    if not isinstance(u, dict):
        return None
    read = as_int(u.get("cacheReadInputTokens"))
    write = as_int(u.get("cacheWriteInputTokens"))
    inp = as_int(u.get("inputTokens"))
    usage = Usage(input=None if inp is None else sum_ints(inp, read, write),
                  output=as_int(u.get("outputTokens")), cached_input=read,
                  cache_write_input=write, total=as_int(u.get("totalTokens")))
    return None if usage.empty() else usage


class _BedrockParser(JSONFrameParser):
    __slots__ = ()

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        event = frame.event
        if frame.fields.get(":message-type") == "exception":
            self.sink.error(f"{event}: {obj.get('message') or obj.get('Message')}")
            return
        if event == "contentBlockDelta":
            delta = obj.get("delta")
            idx = as_index(obj.get("contentBlockIndex"), 0)
            if isinstance(delta, dict):
                if isinstance(delta.get("text"), str) and delta["text"]:
                    self.sink.text((idx,), CONTENT, delta["text"])
                tool = delta.get("toolUse")
                if isinstance(tool, dict) and isinstance(tool.get("input"), str):
                    self.sink.text((idx,), TOOL, tool["input"])
                rc = delta.get("reasoningContent")
                if isinstance(rc, dict) and isinstance(rc.get("text"), str) and rc["text"]:
                    self.sink.text((idx,), REASONING, rc["text"])
        elif event == "contentBlockStart":
            start = obj.get("start")
            tool = start.get("toolUse") if isinstance(start, dict) else None
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                idx = as_index(obj.get("contentBlockIndex"), 0)
                self.sink.text((idx, "name"), TOOL, tool["name"])
        elif event == "messageStop":
            if isinstance(obj.get("stopReason"), str):
                self.sink.finish_reason(obj["stopReason"])
        elif event == "metadata":
            usage = bedrock_usage(obj.get("usage"))
            if usage is not None:
                self.sink.usage(usage)


class BedrockDialect(_SimpleDialect):
    """AWS Bedrock ConverseStream (binary event-stream) and Converse."""

    name = "bedrock"
    model_in_path = re.compile(r"/model/([^/]+)/")

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        info = super().parse_request(path, query, body)
        info.stream = path.endswith("/converse-stream") or path.endswith(
            "/invoke-with-response-stream")
        return info

    def stream_parser(self, sink: Sink) -> _BedrockParser:
        return _BedrockParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if not isinstance(obj, dict):
            return
        out = obj.get("output")
        msg = out.get("message") if isinstance(out, dict) else None
        if isinstance(msg, dict):
            for i, block in enumerate(as_list(msg.get("content"))):
                if not isinstance(block, dict):
                    continue
                if isinstance(block.get("text"), str):
                    sink.text((i,), CONTENT, block["text"])
                if isinstance(block.get("toolUse"), dict):
                    sink.text((i,), TOOL, orjson.dumps(block["toolUse"].get("input")).decode())
                rc = block.get("reasoningContent")
                rt = rc.get("reasoningText") if isinstance(rc, dict) else None
                if isinstance(rt, dict) and isinstance(rt.get("text"), str):
                    sink.text((i,), REASONING, rt["text"])
        if isinstance(obj.get("stopReason"), str):
            sink.finish_reason(obj["stopReason"])
        usage = bedrock_usage(obj.get("usage"))
        if usage is not None:
            sink.usage(usage)
