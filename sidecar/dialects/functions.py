"""Prompt tokens of legacy ``functions`` requests: OpenAI renders them as a TypeScript namespace.

The rendering and the constants follow hmarr/openai-chat-tokens, whose test table was checked
against the API (see tests/test_dialect_openai.py).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..tokens import Tokenizer


def _format_type(param: dict[str, Any], indent: int) -> str:
    any_of = param.get("anyOf")
    if isinstance(any_of, list):
        return " | ".join(_format_type(p, indent) for p in any_of if isinstance(p, dict))
    kind = param.get("type")
    enum = param.get("enum")
    if kind == "string":
        return " | ".join(f'"{v}"' for v in enum) if enum else "string"
    if kind in ("number", "integer"):
        return " | ".join(str(v) for v in enum) if enum else "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "object":
        return "\n".join(["{", _format_properties(param, indent + 2), "}"])
    if kind == "array":
        items = param.get("items")
        return f"{_format_type(items, indent)}[]" if isinstance(items, dict) else "any[]"
    return ""


def _format_properties(obj: dict[str, Any], indent: int) -> str:
    lines = []
    required = obj.get("required") or []
    for name, param in (obj.get("properties") or {}).items():
        if not isinstance(param, dict):
            continue
        if param.get("description") and indent < 2:
            lines.append(f"// {param['description']}")
        optional = "" if name in required else "?"
        lines.append(f"{name}{optional}: {_format_type(param, indent)},")
    return "\n".join(" " * indent + line for line in lines)


def format_functions(functions: list[Any]) -> str:
    lines = ["namespace functions {", ""]
    for fn in functions:
        if not isinstance(fn, dict):
            continue
        if fn.get("description"):
            lines.append(f"// {fn['description']}")
        params = fn.get("parameters") or {}
        if params.get("properties"):
            lines.append(f"type {fn.get('name')} = (_: {{")
            lines.append(_format_properties(params, 0))
            lines.append("}) => any;")
        else:
            lines.append(f"type {fn.get('name')} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


def _message_tokens(msg: dict[str, Any], tok: Tokenizer) -> int:
    fc = msg.get("function_call") if isinstance(msg.get("function_call"), dict) else None
    parts = [msg.get("role"), msg.get("content"), msg.get("name"),
             fc.get("name") if fc else None, fc.get("arguments") if fc else None]
    n = sum(tok.count(p) for p in parts if isinstance(p, str) and p)
    n += 3
    if msg.get("name"):
        n += 1
    if msg.get("role") == "function":
        n -= 2
    if fc:
        n += 3
    return n


def estimate_legacy_chat(messages: list[Any], functions: list[Any] | None,
                         function_call: Any, tok: Tokenizer) -> int:
    """Prompt tokens of a chat request that uses legacy functions or function messages."""
    padded = False
    n = 0
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        if functions and msg.get("role") == "system" and not padded:
            msg = {**msg, "content": f"{msg.get('content') or ''}\n"}
            padded = True
        n += _message_tokens(msg, tok)
    n += 3
    if functions:
        n += tok.count(format_functions(functions)) + 9
        if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            n -= 4
    if function_call and function_call != "auto":
        if function_call == "none":
            n += 1
        elif isinstance(function_call, dict):
            n += tok.count(str(function_call.get("name", ""))) + 4
    return n


def functions_delta(messages: list[Any], functions: list[Any], tok: Tokenizer) -> int:
    """What ``functions`` add to estimate_legacy_chat(messages, None, None): the namespace, and
    the newline it appends to the first system message (every other message counts the same
    either way, so only that one is counted again)."""
    n = tok.count_rendered(orjson.dumps(functions), lambda: format_functions(functions)) + 9
    first = next((m for m in messages if isinstance(m, dict) and m.get("role") == "system"),
                 None)
    if first is not None:
        n -= 4
        content = first.get("content")
        n += tok.count(f"{content or ''}\n") - (
            tok.count(content) if isinstance(content, str) and content else 0)
    return n


def uses_legacy_functions(body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    return bool(body.get("functions")) or any(
        isinstance(m, dict) and (m.get("role") == "function" or m.get("function_call"))
        for m in messages)
