"""OpenAI chat completions, legacy completions and embeddings, streaming and not.

Also every OpenAI-compatible API: Azure OpenAI (deployment paths), DeepSeek, Mistral, Groq, xAI,
OpenRouter, Perplexity, Zhipu v4, DashScope compatible mode, Ollama's /v1, and gateways.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..frames import Frame
from ..structure import family_of
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
    request_info,
    tool_calls,
)
from .functions import estimate_legacy_chat, functions_delta, uses_legacy_functions
from .images import data_url_size, openai_image_tokens

_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


def usage_from(obj: Any) -> Usage | None:
    """An OpenAI-style usage object -> Usage, with the providers' variations folded in.

    - DeepSeek reports cache hits as ``prompt_cache_hit_tokens``.
    - xAI reports reasoning outside ``completion_tokens`` (total = prompt + completion +
      reasoning); output includes reasoning in our semantics, so it is added back. Perplexity
      does the same with top-level ``reasoning_tokens`` and ``citation_tokens``.
    - OpenRouter states the request's cost in ``cost`` (USD), xAI in ``cost_in_usd_ticks``
      (1e-10 USD); Perplexity counts searches in ``num_search_queries``.
    """
    if not isinstance(obj, dict):
        return None
    inp = as_int(obj.get("prompt_tokens"))
    out = as_int(obj.get("completion_tokens"))
    total = as_int(obj.get("total_tokens"))
    u = Usage(input=inp, output=out, total=total)
    pd = obj.get("prompt_tokens_details")
    if isinstance(pd, dict):
        u.cached_input = as_int(pd.get("cached_tokens"))
        u.input_audio = as_int(pd.get("audio_tokens"))
    if u.cached_input is None:
        u.cached_input = as_int(obj.get("prompt_cache_hit_tokens"))
    cd = obj.get("completion_tokens_details")
    if isinstance(cd, dict):
        u.reasoning = as_int(cd.get("reasoning_tokens"))
        u.output_audio = as_int(cd.get("audio_tokens"))
    r = u.reasoning
    if r and inp is not None and out is not None and total is not None and total == inp + out + r:
        u.output = out + r
    elif u.reasoning is None and inp is not None and out is not None and (
            "reasoning_tokens" in obj or "citation_tokens" in obj):
        extra = [as_int(obj.get(k)) or 0 for k in ("reasoning_tokens", "citation_tokens")]
        if any(extra) and (total is None or total == inp + out + sum(extra)):
            u.output = out + sum(extra)
            u.reasoning = extra[0] or None
    cost = obj.get("cost")
    if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
        u.cost_usd = float(cost)
    ticks = as_int(obj.get("cost_in_usd_ticks"))
    if ticks is not None:
        u.cost_usd = ticks / 1e10
    searches = obj.get("num_search_queries")
    if searches is not None:
        u.server_tools = tool_calls(web_search=as_int(searches))
    if inp is not None or out is not None:
        return u
    return None if u.empty() else u


def _tool_calls(idx: Any, calls: Any, sink: Sink) -> None:
    if not isinstance(calls, list):
        return
    for pos, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        j = as_index(call.get("index"), pos)
        fn = call.get("function")
        if isinstance(fn, dict):
            name = fn.get("name")
            if isinstance(name, str) and name:
                sink.text((idx, TOOL, j, "name"), TOOL, name)
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                sink.text((idx, TOOL, j), TOOL, args)
            elif isinstance(args, dict):  # Ollama's /api/chat sends arguments as an object
                sink.text((idx, TOOL, j), TOOL, orjson.dumps(args).decode())


def message_parts(idx: Any, msg: dict[str, Any], sink: Sink) -> None:
    """Text carried by a streamed ``delta`` or a whole ``message``: same fields in both."""
    content = msg.get("content")
    if isinstance(content, str) and content:
        sink.text((idx, CONTENT), CONTENT, content)
        if len(msg) == 1:
            return  # the common delta: {"content": "..."} and nothing else

    elif isinstance(content, list):  # Mistral's thinking chunks: [{"type": "thinking"...}]
        for part in content:
            if isinstance(part, dict):
                kind = REASONING if part.get("type") == "thinking" else CONTENT
                for text in _part_texts(part):
                    sink.text((idx, kind), kind, text)
    refusal = msg.get("refusal")
    if isinstance(refusal, str) and refusal:
        sink.text((idx, "refusal"), CONTENT, refusal)
    for key in ("reasoning_content", "reasoning", "thinking"):
        reasoning = msg.get(key)
        if isinstance(reasoning, str) and reasoning:
            sink.text((idx, REASONING), REASONING, reasoning)
            break
    _tool_calls(idx, msg.get("tool_calls"), sink)
    fc = msg.get("function_call")
    if isinstance(fc, dict):
        _tool_calls(idx, [{"index": 0, "function": fc}], sink)


def _part_texts(part: dict[str, Any]) -> list[str]:
    text = part.get("text")
    if isinstance(text, str):
        return [text] if text else []
    inner = part.get("thinking")
    if isinstance(inner, list):
        return [t for p in inner if isinstance(p, dict) for t in _part_texts(p)]
    return []


def read_completion(obj: dict[str, Any], sink: Sink, *, streamed: bool,
                    last_model: str | None = None) -> str | None:
    """One chunk (streamed) or one whole answer: model, choices, usage, error. Returns the
    model named, so a stream reports it once rather than on every chunk."""
    model = obj.get("model")
    if isinstance(model, str) and model and model != last_model:
        sink.model(model)
        tier = obj.get("service_tier")
        if isinstance(tier, str) and tier:
            sink.usage(Usage(service_tier=tier))
    err = obj.get("error")
    if err:
        msg = err.get("message") if isinstance(err, dict) else err
        sink.error(str(msg))
    choices = obj.get("choices")
    if isinstance(choices, list):
        for pos, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            idx = as_index(choice.get("index"), pos)
            part = choice.get("delta" if streamed else "message")
            if isinstance(part, dict):
                message_parts(idx, part, sink)
            text = choice.get("text")  # legacy completions
            if isinstance(text, str) and text:
                sink.text((idx, CONTENT), CONTENT, text)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                sink.finish_reason(reason)
    raw = obj.get("usage")
    if raw is None and "x_groq" in obj:
        xg = obj["x_groq"]  # Groq's older streams carry usage only here
        raw = xg.get("usage") if isinstance(xg, dict) else None
    if raw is not None:
        usage = usage_from(raw)
        if usage is not None:
            if obj.get("object") == "list" and isinstance(obj.get("data"), list):
                usage.output = 0  # embeddings: nothing is generated
            sink.usage(usage)
    return model if isinstance(model, str) else last_model


class OpenAIStreamParser(JSONFrameParser):
    __slots__ = ("_model",)

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self._model: str | None = None

    def on_object(self, obj: dict[str, Any], frame: Frame) -> None:
        self._model = read_completion(obj, self.sink, streamed=True, last_model=self._model)


def _text_of(content: Any, tok: Tokenizer, model: str | None = None) -> int:
    """Tokens of a message field: strings, the text parts of a content list, and images where
    OpenAI publishes the formula (see images.py)."""
    if isinstance(content, str):
        return tok.count(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    n += tok.count(text)
                image = part.get("image_url")
                if isinstance(image, dict | str):
                    url = image.get("url") if isinstance(image, dict) else image
                    detail = image.get("detail") if isinstance(image, dict) else None
                    size = data_url_size(url) if isinstance(url, str) else None
                    n += openai_image_tokens(model, size, detail) or 0
            elif isinstance(part, str):
                n += tok.count(part)
        return n
    if content is None:
        return 0
    return tok.count(orjson.dumps(content).decode())


# Chat templates of open models served behind OpenAI-format APIs: (tokens per message beyond its
# fields' text, which includes the role's name; tokens per request). Qwen: '<|im_start|>ROLE\n
# ... <|im_end|>\n' per message, '<|im_start|>assistant\n' primes the reply. Mistral (Tekken
# v7+): '<s>' once, '[INST] ... [/INST]' per message in place of the role. DeepSeek V3/V4: a
# role token per message in place of the role, '<|begin_of_sentence|>', '<|Assistant|>' and the
# think tags once (4 on the recorded deepseek-reasoner capture). GLM-4: '<|ROLE|>\n' per
# message, '[gMASK]<sop>' and '<|assistant|>' once.
_CHAT_TEMPLATES = {"qwen": (4, 3), "mistral": (1, 1), "deepseek": (0, 4), "glm": (1, 3)}


def estimate_chat_prompt(messages: list[Any], model: str | None, tok: Tokenizer) -> int:
    """OpenAI's published per-message formula (OpenAI Cookbook, "How to count tokens").

    Every message costs 3 tokens of framing plus its fields, a ``name`` one more, and every reply
    is primed with 3. gpt-3.5-turbo-0301 used 4 per message and -1 per name. Open models behind
    the same API frame messages with their own chat template (_CHAT_TEMPLATES).
    """
    per_message, per_name = (4, -1) if model and "0301" in model else (3, 1)
    primer = 3
    template = _CHAT_TEMPLATES.get(family_of(model))
    if template is not None:
        per_message, primer = template
        per_name = 0
    n = 0
    count = tok.count
    for message in messages:
        if not isinstance(message, dict):
            continue
        n += per_message
        for key, value in message.items():
            # Most fields are strings (role, content): counted here, the rest by _text_of.
            n += count(value) if type(value) is str else _text_of(value, tok, model)
            if key == "name":
                n += per_name
    return n + primer


def rendered_tools(messages: list[Any], tools: list[Any], tok: Tokenizer) -> int:
    """Tokens ``tools`` add to a chat prompt, as OpenAI renders function tools: the TypeScript
    namespace of legacy ``functions`` (functions.py, checked against hmarr's API-verified
    cases), with its effect on the system message. It equals the Cookbook's published tool
    count (weather-tools: 101 on gpt-4o, 105 on gpt-4) and follows long descriptions closer
    than the Cookbook's per-field formula (the recorded gpt-4o parallel-tools request: 370
    against 364 reported; the formula says 414). Non-function tools are left to the formula."""
    functions = [t["function"] for t in tools if isinstance(t, dict)
                 and isinstance(t.get("function"), dict)]
    others = [t for t in tools if not (isinstance(t, dict) and isinstance(t.get("function"),
                                                                        dict))]
    n = estimate_tools(others, None, tok) if others else 0
    if functions:
        n += functions_delta(messages, functions, tok)
    return n


def estimate_tools(tools: list[Any], model: str | None, tok: Tokenizer) -> int:
    """Tokens of ``tools`` definitions: the OpenAI Cookbook's num_tokens_for_tools()."""
    o200k = tok.name == "o200k_base"
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = (
        (7, 3, 3, -3, 3, 12) if o200k else (10, 3, 3, -3, 3, 12))
    n = 0
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            continue
        n += func_init
        desc = str(fn.get("description") or "").removesuffix(".")
        n += tok.count(f"{fn.get('name', '')}:{desc}")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            n += prop_init
            for key, prop in props.items():
                n += prop_key
                if not isinstance(prop, dict):
                    continue
                enum = prop.get("enum")
                if isinstance(enum, list):
                    n += enum_init
                    for item in enum:
                        n += enum_item + tok.count(str(item))
                pdesc = str(prop.get("description") or "").removesuffix(".")
                n += tok.count(f"{key}:{prop.get('type', '')}:{pdesc}")
    return n + func_end if n else 0


class OpenAIDialect:
    """The OpenAI chat/completions wire format."""

    name = "openai"
    multi_choice = True  # slots start with the choice index (n > 1 answers)

    def parse_request(self, path: str, query: str, body: bytes) -> RequestInfo:
        deployment = _AZURE_DEPLOYMENT.search(path)  # Azure names the model in the path
        info = request_info(body, model=deployment.group(1) if deployment else None)
        info.embeddings = path.rstrip("/").endswith("/embeddings")
        return info

    def estimate_prompt(self, info: RequestInfo, tokenizer: Tokenizer) -> int:
        body = info.body
        if not isinstance(body, dict):
            return 0
        messages = body.get("messages")
        if isinstance(messages, list):
            if uses_legacy_functions(body):
                functions = body.get("functions")
                n = estimate_legacy_chat(messages, functions if isinstance(functions, list)
                                         else None, body.get("function_call"), tokenizer)
            else:
                n = estimate_chat_prompt(messages, info.model, tokenizer)
            tools = body.get("tools")
            if isinstance(tools, list) and tools:
                n += rendered_tools(messages, tools, tokenizer)
            return n
        prompt = body.get("prompt", body.get("input"))
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

    def fast_lane(self, parser: Any) -> fl.TemplateLane | None:
        return fast_lane(parser) if isinstance(parser, OpenAIStreamParser) else None

    def parse_body(self, obj: Any, sink: Sink) -> None:
        if isinstance(obj, dict):
            read_completion(obj, sink, streamed=False)


# -- fast lane ------------------------------------------------------------------------------------

# Every key the reader takes text from (see fastlane.py: a template is learned only around the one
# string of these keys in an event), and the padding OpenAI adds to each chunk.
_TEXT_KEYS = ("content", "reasoning_content", "reasoning", "thinking", "refusal", "text",
              "arguments", "name")
_VOLATILE = fl.volatile("obfuscation")


def fast_lane(parser: OpenAIStreamParser) -> fl.TemplateLane:
    """Chunks that carry one text (content, reasoning, refusal, tool arguments) and nothing else;
    their templates hold for as long as the stream's model stays the one they were learned
    under (a new model is news the general path must read)."""
    return fl.TemplateLane(_TEXT_KEYS, _VOLATILE, lambda: parser._model)
