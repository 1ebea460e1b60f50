"""Provider wire formats: one module per dialect, all sans-IO."""

from __future__ import annotations

from .base import Dialect, RequestInfo, Sink, Usage
from .openai import OpenAIDialect

DIALECTS: dict[str, Dialect] = {"openai": OpenAIDialect()}


def get_dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        known = ", ".join(sorted(DIALECTS))
        raise ValueError(f"unknown dialect {name!r}; known: {known}") from None


__all__ = ["DIALECTS", "Dialect", "RequestInfo", "Sink", "Usage", "get_dialect"]
