"""`sidecar replay`: sniffing, per-file results and the per-folder summary."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from sidecar.cli import main
from sidecar.replay import main as replay_main
from sidecar.replay import sniff

from .conftest import chat_chunks, conformance_dir, sse


@pytest.mark.parametrize("data, name, dialect", [
    (b'data: {"type":"message_start"}\n\n', "a.sse", "anthropic"),
    (b'event: response.created\ndata: {"type":"response.created"}\n\n', "a.sse",
     "openai-responses"),
    (b'data: {"candidates": []}\r\n\r\n', "a.sse", "gemini"),
    (b'[{"candidates": []}]', "a.json", "gemini"),
    (b'{"model":"x","response":"a","done":false}\n', "a.ndjson", "ollama"),
    (b'data: {"result":"x","is_end":false,"sentence_id":0}\n\n', "a.sse", "ernie"),
    (b"event: add\ndata: hi\n\n", "a.sse", "zhipu-v3"),
    (b'data: {"choices":[]}\n\n', "a.sse", "openai"),
])
def test_sniff(data: bytes, name: str, dialect: str) -> None:
    assert sniff(data, name)[0] == dialect


def test_replay_own_files_json(tmp_path: Path) -> None:
    d = tmp_path / "myprov"
    d.mkdir()
    (d / "one.sse").write_bytes(chat_chunks("hello there friend", 3, usage={
        "prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}))
    (d / "one.request.json").write_bytes(orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
    (d / "two.sse").write_bytes(sse({"choices": [{"delta": {"content": "x"}}]}))
    out = io.StringIO()
    assert replay_main([str(tmp_path)], as_json=True, out=out) == 0
    data = orjson.loads(out.getvalue())
    one = next(f for f in data["files"] if f["file"].endswith("one.sse"))
    assert one["reported_output"] == 3 and one["estimated_output"] == 3
    assert one["tokenizer"] == "o200k_base"  # gpt-4o: exact
    assert one["estimated_input"] == 8 and one["source"] == "reported"
    assert data["summary"] == [{"group": "myprov", "files": 2, "with_usage": 1,
                                "output_estimate_median_abs_error": 0.0,
                                "output_estimate_p90_abs_error": 0.0,
                                "output_estimate_warm_median_abs_error": 0.0,
                                "output_estimate_warm_p90_abs_error": 0.0,
                                "input_estimate_median_abs_error": pytest.approx(3 / 11),
                                "input_estimate_p90_abs_error": pytest.approx(3 / 11),
                                "input_estimate_warm_median_abs_error": pytest.approx(3 / 11),
                                "input_estimate_warm_p90_abs_error": pytest.approx(3 / 11),
                                "unestimable": {}, "hidden_input": {}, "frame_errors": 0}]
    assert [(k["kind"], k["files"]) for k in data["by_kind"]] == [("text", 2)]


def test_percentiles_and_kinds() -> None:
    from sidecar.replay import Result, _p90, by_kind

    assert _p90([0.1, 0.5, 0.2, 0.3, 0.05, 0.0, 0.4, 0.25, 0.15, 0.9]) == 0.5
    assert _p90([0.3]) == 0.3 and _p90([]) is None

    def res(kind: str, est: int, rep: int) -> Result:
        return Result(file=kind, group="g", dialect="openai", model=None, reported_input=None,
                      reported_output=rep, hidden_reasoning=0, estimated_input=None,
                      estimated_output=est, settled_input=0, settled_output=rep,
                      source="reported", frame_errors=0, kind=kind, estimated_visible=est)

    rows = {r["kind"]: r for r in by_kind([res("tool", 5, 10), res("tool", 9, 10),
                                           res("text", 10, 10)])}
    assert rows["tool"]["output_estimate_median_abs_error"] == pytest.approx(0.3)
    assert rows["tool"]["output_estimate_p90_abs_error"] == pytest.approx(0.5)
    assert rows["text"]["output_estimate_p90_abs_error"] == 0.0


def test_replay_cli_table_and_no_files(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path)]) == 2
    (tmp_path / "a.sse").write_bytes(chat_chunks("abc", 1))
    assert main(["replay", str(tmp_path / "a.sse")]) == 0
    assert "provider (folder)" in capsys.readouterr().out


@pytest.mark.skipif(conformance_dir() is None, reason="conformance fixtures not found")
def test_replay_whole_fixture_folder_reads_every_stream() -> None:
    base = conformance_dir()
    assert base is not None
    out = io.StringIO()
    assert replay_main([str(base / "streams")], as_json=True, out=out) == 0
    data = orjson.loads(out.getvalue())
    manifest = orjson.loads((base / "streams" / "MANIFEST.json").read_bytes())
    assert len(data["files"]) == len(manifest)
    by_file = {Path(f["file"]).relative_to(base / "streams").as_posix(): f
               for f in data["files"]}
    for entry in manifest:
        got = by_file[entry["file"]]
        assert got["frame_errors"] == 0, entry["file"]
        if entry["reported_usage"]:
            assert got["source"] == "reported", entry["file"]
    assert {row["group"] for row in data["summary"]} >= {"openai", "anthropic", "gemini"}
