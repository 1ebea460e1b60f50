"""Prompt tokens of images, where the provider publishes the formula (sans-IO).

Image sizes are read from the headers of base64 data (PNG, JPEG, GIF, WebP); an image given
only by URL has no known size and is not counted (its tokens show up as the gap between the
estimate and the reported input).
"""

from __future__ import annotations

import base64
import binascii
import math

# OpenAI tile models: (base tokens, tokens per 512 px tile).
_TILES = (("gpt-4o-mini", (2833, 5667)), ("gpt-4o", (85, 170)), ("chatgpt-4o", (85, 170)),
          ("gpt-4.5", (85, 170)), ("gpt-4-turbo", (85, 170)), ("o1", (85, 170)),
          ("o3", (85, 170)))
# OpenAI patch models: tokens per 32 px patch (1,536 patches at most).
_PATCHES = (("gpt-4.1-mini", 1.62), ("gpt-4.1-nano", 2.46), ("o4-mini", 1.72))


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, GIF or WebP image."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8X":
            return (int.from_bytes(data[24:27], "little") + 1,
                    int.from_bytes(data[27:30], "little") + 1)
        if kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8 ":
            return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                    int.from_bytes(data[28:30], "little") & 0x3FFF)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF):
                return (int.from_bytes(data[i + 7:i + 9], "big"),
                        int.from_bytes(data[i + 5:i + 7], "big"))
            i += 2 + length
    return None


def data_url_size(url: str) -> tuple[int, int] | None:
    """The size of an image in a ``data:image/...;base64,`` URL (only its header is decoded)."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head = url.split(";base64,", 1)[1][:4096]
    head = head[: len(head) // 4 * 4]
    try:
        return image_size(base64.b64decode(head))
    except (binascii.Error, ValueError):
        return None


def openai_image_tokens(model: str | None, size: tuple[int, int] | None,
                        detail: str | None) -> int | None:
    """OpenAI's published image formula for ``model``, or None when it is not known."""
    name = (model or "").lower().rsplit("/", 1)[-1]
    for prefix, multiplier in _PATCHES:
        if name.startswith(prefix):
            return None if size is None else round(_patches(*size) * multiplier)
    for prefix, (base, per_tile) in _TILES:
        if name.startswith(prefix):
            if detail == "low":
                return base
            return None if size is None else base + per_tile * _tiles(*size)
    return None


def _tiles(width: int, height: int) -> int:
    """512 px tiles after fitting in 2048x2048 and scaling the short side down to 768."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return math.ceil(w / 512) * math.ceil(h / 512)


def _patches(w: int, h: int, cap: int = 1536) -> int:
    """32 px patches, the image scaled down to at most ``cap`` patches (OpenAI's recipe)."""
    patches = math.ceil(w / 32) * math.ceil(h / 32)
    if patches <= cap:
        return patches
    shrink = math.sqrt(cap * 32 * 32 / (w * h))
    w1, h1 = w * shrink, h * shrink
    fit = math.floor(w1 / 32) / (w1 / 32)  # a whole number of patches across
    w2, h2 = w1 * fit, h1 * fit
    return math.ceil(w2 / 32) * math.ceil(h2 / 32)


def anthropic_image_tokens(size: tuple[int, int] | None) -> int | None:
    """Anthropic: width x height / 750, after scaling the long edge down to 1568 px."""
    if size is None:
        return None
    w, h = size
    if max(w, h) > 1568:
        s = 1568 / max(w, h)
        w, h = round(w * s), round(h * s)
    return round(w * h / 750)


def base64_size(data: str) -> tuple[int, int] | None:
    """The size of a base64-encoded image (only its header is decoded)."""
    head = data[:4096]
    head = head[: len(head) // 4 * 4]
    try:
        return image_size(base64.b64decode(head))
    except (binascii.Error, ValueError):
        return None


def gemini_image_tokens(model: str | None, size: tuple[int, int] | None) -> int | None:
    """Gemini 1.5 and 2.x (Google's published rule): 258 tokens when both sides are at most
    384 px, else 258 per 768x768 tile. Gemini 3 counts by media resolution: not guessed."""
    name = (model or "").lower().rsplit("/", 1)[-1]
    if size is None or not name.startswith(("gemini-1.5", "gemini-2")):
        return None
    w, h = size
    if w <= 384 and h <= 384:
        return 258
    return 258 * math.ceil(w / 768) * math.ceil(h / 768)
