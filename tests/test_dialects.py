"""Dialect detection and provider labels."""

from __future__ import annotations

import pytest

from sidecar.dialects import detect, get_dialect, provider_for


@pytest.mark.parametrize("path, headers, dialect", [
    ("/v1/chat/completions", {}, "openai"),
    ("/openai/deployments/gpt4o/chat/completions", {}, "openai"),
    ("/v1/responses", {}, "openai-responses"),
    ("/v1/messages", {"anthropic-version": "2023-06-01"}, "anthropic"),
    ("/v1beta/models/gemini-2.5-pro:streamGenerateContent", {}, "gemini"),
    ("/v1/projects/p/locations/l/publishers/google/models/g:generateContent", {}, "gemini"),
    ("/v1beta/interactions", {}, "gemini"),
    ("/api/chat", {}, "ollama"), ("/api/generate", {}, "ollama"),
    ("/v1/chat/completions", {}, "openai"),
    ("/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/ernie-4.0-8k", {}, "ernie"),
    ("/api/v1/services/aigc/text-generation/generation", {}, "dashscope"),
    ("/compatible-mode/v1/chat/completions", {}, "openai"),
    ("/api/paas/v3/model-api/chatglm_turbo/sse-invoke", {}, "zhipu-v3"),
    ("/api/paas/v4/chat/completions", {}, "openai"),
    ("/v2/chat", {}, "cohere"),
    ("/model/amazon.nova-micro-v1:0/converse-stream", {}, "bedrock"),
])
def test_detect(path: str, headers: dict[str, str], dialect: str) -> None:
    assert detect(path, headers) == dialect


def test_detect_outside_v1_asks_the_header_every_time() -> None:
    """Paths are memoized; a /messages path outside /v1/ depends on the request's headers, so
    the answer for one request must not stick to the next."""
    for _ in range(2):
        assert detect("/anthropic/messages", {"Anthropic-Version": "2023-06-01"}) == "anthropic"
        assert detect("/anthropic/messages", {}) == "openai"
        assert detect("/anthropic/messages") == "openai"


@pytest.mark.parametrize("dialect, host, provider", [
    ("openai", "api.openai.com", "openai"), ("openai", "myres.openai.azure.com", "azure-openai"),
    ("openai", "api.deepseek.com", "deepseek"), ("openai", "one-api", "openai"),
    ("anthropic", "127.0.0.1", "anthropic"), ("openai", "dashscope.aliyuncs.com", "alibaba-qwen"),
    ("ernie", None, "baidu-ernie"), ("bedrock", "bedrock-runtime.us-east-1.amazonaws.com",
                                     "bedrock"),
])
def test_provider_labels(dialect: str, host: str | None, provider: str) -> None:
    assert provider_for(dialect, host) == provider


def test_unknown_dialect_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="known: anthropic"):
        get_dialect("nope")
