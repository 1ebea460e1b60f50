"""Fuzzing: a bounded coverage-guided run (atheris) and property tests over every dialect."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dialects import DIALECTS
from sidecar.frames import Frame
from sidecar.tokens import Tokenizers

from .conftest import ROOT
from .test_dialect_openai import Recorder

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from([
        "type", "choices", "delta", "content", "text", "usage", "message", "index", "model",
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "usageMetadata",
        "candidates", "parts", "result", "is_end", "output", "tool_calls", "function",
        "arguments", "event_type", "response", "error", "done", "eval_count", "thought",
        "reasoning_content", "cache_read_input_tokens", "finish_reason", "x_groq"]),
        children, max_size=6),
    max_leaves=25)


# Hypothesis tests cannot take function-scoped fixtures; encodings are cached process-wide anyway.
_TOK = Tokenizers()


def test_atheris_finds_no_crash(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "corpus", corpus)
    res = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_meter.py"), "-runs=6000",
                          str(corpus)], capture_output=True, text=True, cwd=ROOT, check=False,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Done 6000 runs" in res.stderr


@given(obj=JSON, event=st.none() | st.sampled_from(
    ["message_start", "message_delta", "content_block_delta", "error", "add", "finish",
     "metadata", "contentBlockDelta", "response.completed", "step.delta"]),
       name=st.sampled_from(sorted(DIALECTS)))
@settings(max_examples=600, deadline=None)
def test_dialects_accept_any_json_frame(obj: Any, event: str | None, name: str) -> None:
    rec = Recorder()
    dialect = DIALECTS[name]
    frame = Frame(data=orjson.dumps(obj), event=event,
                  fields={"meta": orjson.dumps(obj).decode()} if name == "zhipu-v3" else {})
    dialect.stream_parser(rec).on_frame(frame)
    dialect.parse_body(obj, rec)
    for usage in rec.usages:
        assert all(v is None or isinstance(v, int) for v in (usage.input, usage.output))


@given(body=st.binary(max_size=300) | JSON.map(orjson.dumps), name=st.sampled_from(
    sorted(DIALECTS)), path=st.sampled_from(["/v1/chat/completions", "/api/chat",
                                             "/model/x/converse-stream", "/v1beta/models/g:x"]))
@settings(max_examples=300, deadline=None)
def test_request_parsing_accepts_any_body(body: bytes, name: str, path: str) -> None:
    dialect = DIALECTS[name]
    info = dialect.parse_request(path, "alt=sse", body)
    assert dialect.estimate_prompt(info, _TOK.for_model(info.model)) >= 0


def test_unhashable_or_odd_indexes_are_tolerated() -> None:
    for name in sorted(DIALECTS):
        rec = Recorder()
        odd = {"index": {"a": 1}, "output_index": [1], "contentBlockIndex": None, "choices": [
            {"index": {"x": 1}, "delta": {"content": "hi", "tool_calls": [{"index": [2]}]}}]}
        DIALECTS[name].stream_parser(rec).on_frame(Frame(data=orjson.dumps(odd)))
        assert all(hash(slot) is not None for slot, _, _ in rec.texts)
