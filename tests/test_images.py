"""Image prompt tokens: sizes from image headers, and the providers' published formulas."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from sidecar.dialects.images import (
    anthropic_image_tokens,
    data_url_size,
    image_size,
    openai_image_tokens,
)
from sidecar.dialects.openai import OpenAIDialect
from sidecar.tokens import Tokenizers


def png(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof + b"\xff\xd9"


def test_sizes_from_headers() -> None:
    assert image_size(png(1024, 768)) == (1024, 768)
    assert image_size(jpeg(640, 480)) == (640, 480)
    assert image_size(b"GIF89a" + struct.pack("<HH", 30, 20) + b"\x00" * 4) == (30, 20)
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x00" * 8 + (799).to_bytes(3, "little") \
        + (599).to_bytes(3, "little")
    assert image_size(vp8x) == (800, 600)
    assert image_size(b"not an image") is None
    url = "data:image/png;base64," + base64.b64encode(png(300, 200) + b"\x00" * 5000).decode()
    assert data_url_size(url) == (300, 200)
    assert data_url_size("https://example.com/cat.png") is None


@pytest.mark.parametrize("model, size, detail, tokens", [
    # Published OpenAI examples (vision guide, "Calculating costs").
    ("gpt-4o", (1024, 1024), "high", 765),
    ("gpt-4o", (2048, 4096), "high", 1105),
    ("gpt-4o", (4096, 8192), "low", 85),
    ("gpt-4o-mini", (1024, 1024), "high", 2833 + 4 * 5667),
    ("gpt-4.1-mini", (1024, 1024), None, round(1024 * 1.62)),
    ("gpt-4.1-nano", (1800, 2400), None, round(1452 * 2.46)),  # 1452 patches after scaling
    ("o4-mini", (1800, 2400), None, round(1452 * 1.72)),
    ("gpt-4o", None, "auto", None),  # a URL image: size unknown, not guessed
    ("gpt-5", (1024, 1024), "high", None),  # no published formula known here
])
def test_openai_formula(model: str, size: tuple[int, int] | None, detail: str | None,
                        tokens: int | None) -> None:
    assert openai_image_tokens(model, size, detail) == tokens


def test_anthropic_formula() -> None:
    assert anthropic_image_tokens((1092, 1092)) == 1590  # Anthropic's published example
    assert anthropic_image_tokens((3136, 1568)) == round(1568 * 784 / 750)  # long edge 1568
    assert anthropic_image_tokens(None) is None


def test_images_count_in_openai_prompt_estimate() -> None:
    tok = Tokenizers().for_model("gpt-4o")
    url = "data:image/png;base64," + base64.b64encode(png(1024, 1024)).decode()
    d = OpenAIDialect()
    text_only = d.parse_request("/v1/chat/completions", "", b'{"model": "gpt-4o", "messages": '
                                b'[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}')
    with_image = d.parse_request("/v1/chat/completions", "", (
        '{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", '
        f'"text": "hi"}}, {{"type": "image_url", "image_url": {{"url": "{url}", '
        '"detail": "high"}}]}]}').encode())
    assert d.estimate_prompt(with_image, tok) - d.estimate_prompt(text_only, tok) == 765


def test_images_count_in_anthropic_prompt_estimate() -> None:
    from sidecar.dialects.anthropic import AnthropicDialect

    tok = Tokenizers().for_model("claude-sonnet-4-5")
    data = base64.b64encode(jpeg(1092, 1092)).decode()
    d = AnthropicDialect()
    base = b'{"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": ['
    text = b'{"type": "text", "text": "what is this?"}'
    image = ('{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", '
             f'"data": "{data}"}}}}').encode()
    plain = d.estimate_prompt(d.parse_request("/v1/messages", "", base + text + b"]}]}"), tok)
    both = d.estimate_prompt(d.parse_request("/v1/messages", "", base + text + b", " + image
                                             + b"]}]}"), tok)
    assert both - plain == 1590  # the image alone: its base64 data is not counted as text


@pytest.mark.parametrize("model, size, tokens", [
    ("gemini-2.5-flash", (384, 200), 258), ("gemini-2.0-flash", (1024, 1024), 258 * 4),
    ("gemini-1.5-pro", (768, 768), 258), ("gemini-3-pro-preview", (300, 300), None),
    ("gemini-2.5-pro", None, None),
])
def test_gemini_formula(model: str, size: tuple[int, int] | None, tokens: int | None) -> None:
    from sidecar.dialects.images import gemini_image_tokens

    assert gemini_image_tokens(model, size) == tokens


def test_images_count_in_gemini_and_responses_prompt_estimates() -> None:
    import orjson

    from sidecar.dialects import get_dialect

    data = base64.b64encode(png(1000, 700)).decode()
    gemini = get_dialect("gemini")
    tok = Tokenizers().for_model("gemini-2.5-flash")
    text = {"text": "what is this?"}
    path = "/v1beta/models/gemini-2.5-flash:generateContent"

    def gem(parts: list[object]) -> int:
        info = gemini.parse_request(path, "", orjson.dumps({"contents": [{"parts": parts}]}))
        info.model = "gemini-2.5-flash"
        return gemini.estimate_prompt(info, tok)

    image = {"inlineData": {"mimeType": "image/png", "data": data}}
    assert gem([text, image]) - gem([text]) == 258 * 2 * 1  # 2 x 1 tiles of 768 px

    responses = get_dialect("openai-responses")
    tok4o = Tokenizers().for_model("gpt-4o")

    def resp(parts: list[object]) -> int:
        body = {"model": "gpt-4o", "input": [{"role": "user", "content": parts}]}
        return responses.estimate_prompt(responses.parse_request("/v1/responses", "",
                                                                 orjson.dumps(body)), tok4o)

    words = {"type": "input_text", "text": "what is this?"}
    picture = {"type": "input_image", "detail": "high",
               "image_url": "data:image/png;base64," + data}
    assert resp([words, picture]) - resp([words]) == openai_image_tokens(
        "gpt-4o", (1000, 700), "high")
