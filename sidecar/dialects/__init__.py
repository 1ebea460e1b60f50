"""Provider wire formats: one module per dialect, all sans-IO, plus detection."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from .anthropic import AnthropicDialect
from .base import Dialect, RequestInfo, Sink, Usage
from .gemini import GeminiDialect
from .native import (
    BedrockDialect,
    CohereDialect,
    DashScopeDialect,
    ErnieDialect,
    OllamaDialect,
    ZhipuV3Dialect,
)
from .openai import OpenAIDialect
from .responses import ResponsesDialect

DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (OpenAIDialect(), ResponsesDialect(), AnthropicDialect(), GeminiDialect(),
              OllamaDialect(), ErnieDialect(), DashScopeDialect(), ZhipuV3Dialect(),
              CohereDialect(), BedrockDialect())
}
AUTO = "auto"


def get_dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        known = ", ".join(sorted(DIALECTS))
        raise ValueError(f"unknown dialect {name!r}; known: {known}") from None


def detect(path: str, headers: Mapping[str, str] | None = None) -> str:
    """The dialect of a request, from its path (and Anthropic's version header)."""
    found = _by_path(path)
    if found is not None:
        return found
    # ".../messages" outside /v1/: Anthropic's only when the version header says so
    if any(k.lower() == "anthropic-version" for k in (headers or {})):
        return "anthropic"
    return "openai"


@lru_cache(maxsize=4096)
def _by_path(path: str) -> str | None:
    """The dialect a path names, or None when it takes Anthropic's version header to tell."""
    p = path.lower()
    if ":streamgeneratecontent" in p or ":generatecontent" in p or ":embedcontent" in p \
            or ":batchembedcontents" in p or p.rstrip("/").endswith("/interactions"):
        return "gemini"
    if "/wenxinworkshop/" in p:
        return "ernie"
    if "/api/v1/services/aigc/" in p:
        return "dashscope"
    if "/model-api/" in p and ("invoke" in p):
        return "zhipu-v3"
    if "/model/" in p and ("/converse" in p or "/invoke" in p):
        return "bedrock"
    if p.startswith(("/api/chat", "/api/generate", "/api/embed")):
        return "ollama"
    if p.rstrip("/").endswith("/v2/chat"):
        return "cohere"
    if p.rstrip("/").endswith("/messages"):
        return "anthropic" if "/v1/" in p else None
    if p.rstrip("/").endswith("/responses"):
        return "openai-responses"
    return "openai"


# Upstream host suffix -> provider label. First match wins.
_HOSTS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"), (".openai.azure.com", "azure-openai"),
    (".cognitiveservices.azure.com", "azure-openai"), (".services.ai.azure.com", "azure-openai"),
    ("api.anthropic.com", "anthropic"), ("generativelanguage.googleapis.com", "gemini"),
    ("aiplatform.googleapis.com", "vertex"), ("api.deepseek.com", "deepseek"),
    ("api.mistral.ai", "mistral"), ("api.groq.com", "groq"), ("api.x.ai", "xai"),
    ("openrouter.ai", "openrouter"), ("api.perplexity.ai", "perplexity"),
    ("aliyuncs.com", "alibaba-qwen"), ("open.bigmodel.cn", "zhipu"),
    ("baidubce.com", "baidu-ernie"), ("api.cohere.com", "cohere"), ("api.cohere.ai", "cohere"),
    ("amazonaws.com", "bedrock"), ("api.moonshot.cn", "moonshot"),
)
_BY_DIALECT = {"anthropic": "anthropic", "gemini": "gemini", "ernie": "baidu-ernie",
               "dashscope": "alibaba-qwen", "zhipu-v3": "zhipu", "ollama": "ollama",
               "cohere": "cohere", "bedrock": "bedrock"}


def provider_host(host: str | None) -> str | None:
    """The provider label of a known provider API host, else None (a gateway, or self-hosted)."""
    h = (host or "").lower()
    for suffix, name in _HOSTS:
        if h == suffix.lstrip(".") or h.endswith(suffix):
            return name
    return None


def provider_for(dialect: str, host: str | None) -> str:
    """The provider label: from the upstream's host when known, else from the dialect."""
    return provider_host(host) or _BY_DIALECT.get(dialect, "openai")


__all__ = ["AUTO", "DIALECTS", "Dialect", "RequestInfo", "Sink", "Usage", "detect",
           "get_dialect", "provider_for", "provider_host"]
