"""OpenAI chat completions and legacy completions, streaming and not (also the gateway format)."""

from __future__ import annotations

from typing import Any

import orjson

from ..frames import Frame
from ..tokens import Tokenizer
from .base import CONTENT, REASONING, TOOL, RequestInfo, Sink, Usage, as_int


def usage_from(obj: Any) -> Usage | None:
    """OpenAI's usage object -> Usage (chat and legacy completions share it)."""
    if not isinstance(obj, dict):
        return None
    u = Usage(
        input=as_int(obj.get("prompt_tokens")),
        output=as_int(obj.get("completion_tokens")),
        total=as_int(obj.get("total_tokens")),
    )
    pd = obj.get("prompt_tokens_details")
    if isinstance(pd, dict):
        u.cached_input = as_int(pd.get("cached_tokens"))
    cd = obj.get("completion_tokens_details")
    if isinstance(cd, dict):
        u.reasoning = as_int(cd.get("reasoning_tokens"))
    return None if u.empty() else u


def _tool_calls(idx: Any, calls: Any, sink: Sink) -> None:
    if not isinstance(calls, list):
        return
    for pos, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        j = call.get("index", pos)
        fn = call.get("function")
        if isinstance(fn, dict):
            name = fn.get("name")
            if isinstance(name, str) and name:
                sink.text((idx, TOOL, j, "name"), TOOL, name)
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                sink.text((idx, TOOL, j), TOOL, args)


def _message_parts(idx: Any, msg: dict[str, Any], sink: Sink) -> None:
    """Text carried by a streamed ``delta`` or a whole ``message``: same fields in both."""
    content = msg.get("content")
    if isinstance(content, str) and content:
        sink.text((idx, CONTENT), CONTENT, content)
    refusal = msg.get("refusal")
    if isinstance(refusal, str) and refusal:
        sink.text((idx, "refusal"), CONTENT, refusal)
    for key in ("reasoning_content", "reasoning"):
        reasoning = msg.get(key)
        if isinstance(reasoning, str) and reasoning:
            sink.text((idx, REASONING), REASONING, reasoning)
    _tool_calls(idx, msg.get("tool_calls"), sink)
    fc = msg.get("function_call")
    if isinstance(fc, dict):
        _tool_calls(idx, [{"index": 0, "function": fc}], sink)


def read_completion(obj: dict[str, Any], sink: Sink, *, streamed: bool) -> None:
    """One chunk (streamed) or one whole answer: model, choices, usage, error."""
    model = obj.get("model")
    if isinstance(model, str) and model:
        sink.model(model)
    err = obj.get("error")
    if err:
        msg = err.get("message") if isinstance(err, dict) else err
        sink.error(str(msg))
    choices = obj.get("choices")
    if isinstance(choices, list):
        for pos, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            idx = choice.get("index", pos)
            part = choice.get("delta" if streamed else "message")
            if isinstance(part, dict):
                _message_parts(idx, part, sink)
            text = choice.get("text")  # legacy completions
            if isinstance(text, str) and text:
                sink.text((idx, CONTENT), CONTENT, text)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                sink.finish_reason(reason)
    usage = usage_from(obj.get("usage"))
    if usage is not None:
        sink.usage(usage)


class OpenAIStreamParser:
    __slots__ = ("_sink",)

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def on_frame(self, frame: Frame) -> None:
        data = frame.data
        if data is None or data == b"[DONE]":
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._sink.malformed("invalid JSON in data frame")
            return
        if isinstance(obj, dict):
            read_completion(obj, self._sink, streamed=True)
        else:
            self._sink.malformed("data frame is not a JSON object")


def _text_of(content: Any, tok: Tokenizer) -> int:
    """Tokens of a message field: strings, and the text parts of a content list."""
    if isinstance(content, str):
        return tok.count(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    n += tok.count(text)
            elif isinstance(part, str):
                n += tok.count(part)
        return n
    if content is None:
        return 0
    return tok.count(orjson.dumps(content).decode())


def estimate_chat_prompt(messages: list[Any], model: str | None, tok: Tokenizer) -> int:
    """OpenAI's published per-message formula (OpenAI Cookbook, "How to count tokens").

    Every message costs 3 tokens of framing plus its fields, a ``name`` one more, and every reply
    is primed with 3. gpt-3.5-turbo-0301 used 4 per message and -1 per name.
    """
    per_message, per_name = (4, -1) if model and "0301" in model else (3, 1)
    n = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        n += per_message
        for key, value in message.items():
            n += _text_of(value, tok)
            if key == "name":
                n += per_name
    return n + 3


class OpenAIDialect:
    """The OpenAI chat/completions wire format."""

    name = "openai"

    def parse_request(self, path: str, body: bytes) -> RequestInfo:
        info = RequestInfo()
        if not body:
            return info
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return info
        if not isinstance(obj, dict):
            return info
        model = obj.get("model")
        info.model = model if isinstance(model, str) else None
        info.stream = obj.get("stream") is True
        info.body = obj
        return info

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int:
        body = info.body
        if not isinstance(body, dict):
            return 0
        messages = body.get("messages")
        if isinstance(messages, list):
            return estimate_chat_prompt(messages, info.model, tokenizer)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return tokenizer.count(prompt)
        if isinstance(prompt, list):
            if all(isinstance(p, int) for p in prompt):
                return len(prompt)  # already token ids
            return sum(
                tokenizer.count(p) if isinstance(p, str) else len(p) if isinstance(p, list) else 0
                for p in prompt
            )
        return 0

    def stream_parser(self, sink: Sink) -> OpenAIStreamParser:
        return OpenAIStreamParser(sink)

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if isinstance(obj, dict):
            read_completion(obj, sink, streamed=False)
