"""Google Gemini and Vertex AI: generateContent, streamGenerateContent (SSE with ``alt=sse``, or a
streamed JSON array without it), and the Interactions API.

``usageMetadata`` is cumulative in every chunk, so each one replaces the last. Gemini counts
thoughts outside ``candidatesTokenCount``; in our semantics output includes reasoning, so
output = candidates + thoughts, reasoning = thoughts, input = prompt + tool-use prompt, and
cached_input = cachedContentTokenCount (a subset of the prompt).
"""

from __future__ import annotations

import re
from typing import Any

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
    tool_calls,
)
from .images import base64_size, gemini_image_tokens

_MODEL_IN_PATH = re.compile(r"/models/([^/:]+):")


# Vertex AI's trafficType -> the service tier prices are looked up by.
_TRAFFIC_TIERS = {"ON_DEMAND_FLEX": "flex", "ON_DEMAND_PRIORITY": "priority"}


def _modality(details: Any, modality: str) -> int | None:
    for d in as_list(details):
        if isinstance(d, dict) and str(d.get("modality", "")).upper() == modality:
            return as_int(d.get("tokenCount"))
    return None


def usage_from(meta: Any) -> Usage | None:
    if not isinstance(meta, dict):
        return None
    prompt = as_int(meta.get("promptTokenCount"))
    tool_prompt = as_int(meta.get("toolUsePromptTokenCount"))
    # The Live API names the generated tokens response*, generateContent candidates*.
    cand = as_int(meta.get("candidatesTokenCount"))
    if cand is None:
        cand = as_int(meta.get("responseTokenCount"))
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    u = Usage(input=sum_ints(prompt, tool_prompt), output=sum_ints(cand, thoughts),
              cached_input=as_int(meta.get("cachedContentTokenCount")), reasoning=thoughts,
              total=as_int(meta.get("totalTokenCount")),
              input_audio=_modality(meta.get("promptTokensDetails"), "AUDIO"),
              cached_audio_input=_modality(meta.get("cacheTokensDetails"), "AUDIO"),
              output_audio=_modality(meta.get("candidatesTokensDetails")
                                     or meta.get("responseTokensDetails"), "AUDIO"),
              service_tier=_TRAFFIC_TIERS.get(str(meta.get("trafficType"))))
    return None if u.empty() else u


def interactions_usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    thoughts = as_int(obj.get("total_thought_tokens"))
    u = Usage(input=sum_ints(as_int(obj.get("total_input_tokens")),
                             as_int(obj.get("total_tool_use_tokens"))),
              output=sum_ints(as_int(obj.get("total_output_tokens")), thoughts),
              cached_input=as_int(obj.get("total_cached_tokens")), reasoning=thoughts,
              total=as_int(obj.get("total_tokens")))
    return None if u.empty() else u


def read_chunk(obj: dict[str, Any], sink: Sink) -> None:
    """One GenerateContentResponse (a stream chunk or the whole answer)."""
    model = obj.get("modelVersion")
    if isinstance(model, str) and model:
        sink.model(model)
    err = obj.get("error")
    if isinstance(err, dict):
        sink.error(str(err.get("message") or err))
    for pos, cand in enumerate(as_list(obj.get("candidates"))):
        if not isinstance(cand, dict):
            continue
        idx = as_index(cand.get("index"), pos)
        content = cand.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for j, part in enumerate(as_list(parts)):
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str) and text:
                kind = REASONING if part.get("thought") else CONTENT
                sink.text((idx, kind), kind, text)
            fc = part.get("functionCall")
            if isinstance(fc, dict):
                if isinstance(fc.get("name"), str):
                    sink.text((idx, TOOL, j, "name"), TOOL, fc["name"])
                if fc.get("args") is not None:
                    sink.text((idx, TOOL, j), TOOL, orjson.dumps(fc["args"]).decode())
                for partial in fc.get("partialArgs") or []:
                    if isinstance(partial, dict) and isinstance(partial.get("stringValue"), str):
                        sink.text((idx, TOOL, "partial"), TOOL, partial["stringValue"])
        reason = cand.get("finishReason")
        if isinstance(reason, str):
            sink.finish_reason(reason)
        grounding = cand.get("groundingMetadata")
        if isinstance(grounding, dict):
            queries = len(as_list(grounding.get("webSearchQueries")))
            sink.usage(Usage(server_tools=tool_calls(web_search=queries)))
    usage = usage_from(obj.get("usageMetadata"))
    if usage is not None:
        sink.usage(usage)


class GeminiStreamParser(JSONFrameParser):
    __slots__ = ()

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        event = obj.get("event_type")
        if event is None:
            read_chunk(obj, self.sink)
            return
        # The Interactions API.
        if event == "step.delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                text = delta.get("text")
                if isinstance(text, str) and text:
                    kind = REASONING if delta.get("type") == "thought" else CONTENT
                    self.sink.text((as_index(obj.get("index"), 0), kind), kind, text)
        elif event in ("interaction.completed", "interaction.created"):
            inter = obj.get("interaction")
            if isinstance(inter, dict):
                if isinstance(inter.get("model"), str):
                    self.sink.model(inter["model"])
                usage = interactions_usage(inter.get("usage"))
                if usage is not None:
                    self.sink.usage(usage)
                if event == "interaction.completed":
                    self.sink.finish_reason(str(inter.get("status") or "completed"))
        elif event == "error":
            self.sink.error(str(obj.get("error") or "error event"))


class GeminiDialect:
    name = "gemini"

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        m = _MODEL_IN_PATH.search(path)
        streaming = ":streamGenerateContent" in path
        # The Interactions API names the model and the stream flag in the body.
        info = request_info(body, model=m.group(1) if m else None, stream=streaming)
        info.json_stream = streaming and "alt=sse" not in query
        info.embeddings = ":embedContent" in path or ":batchEmbedContents" in path
        return info

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int:
        body = info.body
        if not isinstance(body, dict):
            return 0
        keys = frozenset({"text", "input"})
        n = sum(tokenizer.count(t) for t in texts_of(body.get("systemInstruction"), keys))
        for content in body.get("contents") or []:
            n += sum(tokenizer.count(t) for t in texts_of(content, keys))
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else []:
                blob = part.get("inlineData") or part.get("inline_data") \
                    if isinstance(part, dict) else None
                if isinstance(blob, dict) and isinstance(blob.get("data"), str) and \
                        str(blob.get("mimeType") or blob.get("mime_type") or "").startswith(
                            "image/"):
                    n += gemini_image_tokens(info.model, base64_size(blob["data"])) or 0
        if isinstance(body.get("input"), str | list):  # Interactions API
            n += sum(tokenizer.count(t) for t in texts_of({"input": body["input"]}, keys))
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            n += tokenizer.count(orjson.dumps(tools).decode())
        return n

    def stream_parser(self, sink: Sink) -> GeminiStreamParser:
        return GeminiStreamParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if isinstance(obj, list):  # a whole streamed array read as one body
            for item in obj:
                if isinstance(item, dict):
                    read_chunk(item, sink)
        elif isinstance(obj, dict):
            if "usage" in obj and "outputs" in obj:  # Interactions API, non-streamed
                usage = interactions_usage(obj.get("usage"))
                if usage is not None:
                    sink.usage(usage)
                return
            read_chunk(obj, sink)
