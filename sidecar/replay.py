"""`sidecar replay FILE...`: recorded streams through the same meter, estimated vs reported.

For each file the dialect is sniffed from the bytes (or given), the matching request body is read
from ``NAME.request.json`` beside it when present, and the stream is metered exactly as the proxy
would. The summary groups files by folder (in the shared fixture layout, one folder per provider).
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any, TextIO

import orjson

from .dialects import get_dialect, provider_for
from .dialects.base import REASONING, TOOL, RequestInfo
from .meter import Meter
from .pricing import PROVIDER_IDS, UNLISTED, PriceBook, price_book, price_settlement
from .tokens import Tokenizers

_EXTENSIONS = (".sse", ".ndjson", ".jsonl", ".eventstream", ".json")


def sniff(data: bytes, name: str) -> tuple[str, str]:
    """(dialect, content type) guessed from a recorded body."""
    head = data[:4096]
    # AWS event-stream: a big-endian length prelude (small messages: leading zero bytes).
    if name.endswith(".eventstream") or (head[:2] == b"\x00\x00" and b":event-type" in head):
        return "bedrock", "application/vnd.amazon.eventstream"
    if name.endswith((".ndjson", ".jsonl")):
        return "ollama", "application/x-ndjson"
    if head.lstrip().startswith(b"["):
        return "gemini", "application/json"
    sse = "text/event-stream"
    checks = (
        (b'"message_start"', "anthropic"), (b'"content_block_delta"', "anthropic"),
        (b'"response.', "openai-responses"), (b'"usageMetadata"', "gemini"),
        (b'"candidates"', "gemini"), (b'"event_type"', "gemini"),
        (b'"sentence_id"', "ernie"), (b'"is_end"', "ernie"),
        (b'"message-start"', "cohere"), (b'"content-delta"', "cohere"),
        (b'"request_id"', "dashscope"),
    )
    for needle, dialect in checks:
        if needle in head:
            if dialect == "dashscope" and b'"output"' not in head:
                continue
            return dialect, sse
    if b"event: add" in head or b"event:add" in head or b"meta:" in head:
        return "zhipu-v3", sse
    if head.lstrip().startswith(b"{") and b"\n{" in head:
        return "ollama", "application/x-ndjson"
    if not head.lstrip().startswith((b"data:", b"event:", b":", b"id:")):
        return "openai", "application/json"
    return "openai", sse


@dataclass(slots=True)
class Result:
    file: str
    group: str
    dialect: str
    model: str | None
    reported_input: int | None
    reported_output: int | None
    hidden_reasoning: int  # reported reasoning whose text never appeared in the stream
    estimated_input: int | None
    estimated_output: int
    settled_input: int
    settled_output: int
    source: str
    frame_errors: int
    provider: str = ""
    kind: str = "text"  # tool (tool-call text seen), reasoning (reasoning reported or seen), text
    cost_usd: float | None = None  # None: unpriced
    price_source: str | None = None
    priced_as: str | None = None

    @property
    def output_ratio(self) -> float | None:
        """Estimate / reported, over the text the stream showed (hidden reasoning excluded)."""
        visible = (self.reported_output or 0) - self.hidden_reasoning
        if self.reported_output and visible > 0:
            return self.estimated_output / visible
        return None

    @property
    def input_ratio(self) -> float | None:
        if self.reported_input and self.estimated_input is not None:
            return self.estimated_input / self.reported_input
        return None


def provider_of(path: Path, dialect: str, given: str | None) -> str:
    """The provider label: given, else the folder's name when it is one (the shared fixture
    layout), else the format's default."""
    if given:
        return given
    folder = path.parent.name
    if folder in PROVIDER_IDS or folder in UNLISTED:
        return folder
    return provider_for(dialect, None)


def replay_file(path: Path, tokenizers: Tokenizers, dialect_name: str | None = None,
                chunk: int = 0, *, prices: PriceBook | None = None,
                provider: str | None = None, model: str | None = None) -> Result:
    data = path.read_bytes()
    sniffed, content_type = sniff(data, path.name)
    dialect = get_dialect(dialect_name or sniffed)
    request_path = path.with_name(path.name.rsplit(".", 1)[0] + ".request.json")
    req = request_path.read_bytes() if request_path.exists() else b""
    info = dialect.parse_request("/", "", req) if req else RequestInfo()
    if model:
        info.model = model
    if content_type == "application/json" and dialect.name == "gemini":
        info.json_stream = True

    def run(model: str | None) -> Meter:
        tok = tokenizers.for_model(model)
        meter = Meter(dialect, info, tok, lambda: 0.0)
        if info.body is not None:
            meter.estimate_prompt()
        meter.start_response(content_type, None)
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            meter.feed(data[i:i + step])
        meter.end_of_body()
        return meter

    meter = run(info.model)
    if info.model is None and meter.model_name:
        meter = run(meter.model_name)  # the answer named the model: use its tokenizer
    s = meter.settle()
    r = meter.reported
    label = provider_of(path, dialect.name, provider)
    priced = None
    if prices is not None:
        entry = None
        for name in (s.model, info.model):
            entry = entry or prices.resolve(label, name)
        priced = price_settlement(prices, entry, s, label, time.time())
    return Result(
        file=str(path), group=path.parent.name, dialect=dialect.name, model=s.model,
        reported_input=r.input, reported_output=r.output,
        hidden_reasoning=(r.reasoning or 0) if not meter.saw_reasoning else 0,
        estimated_input=s.estimated_input_tokens if info.body is not None else None,
        estimated_output=s.estimated_output_tokens, settled_input=s.input_tokens,
        settled_output=s.output_tokens, source=s.source, frame_errors=s.frame_errors,
        provider=label, kind=TOOL if TOOL in meter.kinds else (
            REASONING if REASONING in meter.kinds or r.reasoning else "text"),
        cost_usd=priced.usd if priced else None,
        price_source=priced.source if priced else None,
        priced_as=priced.priced_as if priced else None)


def collect(paths: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_EXTENSIONS)
                          and not f.name.endswith(".request.json")
                          and f.name != "MANIFEST.json" and "prompt-tokens" not in f.parts)
        else:
            out.append(p)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{(x - 1) * 100:+.1f}%"


def _p90(values: list[float]) -> float | None:
    """Nearest-rank 90th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def _errors(rs: list[Result]) -> dict[str, float | None]:
    out = [abs(r.output_ratio - 1) for r in rs if r.output_ratio is not None]
    inp = [abs(r.input_ratio - 1) for r in rs if r.input_ratio is not None]
    return {"output_estimate_median_abs_error": median(out) if out else None,
            "output_estimate_p90_abs_error": _p90(out),
            "input_estimate_median_abs_error": median(inp) if inp else None,
            "input_estimate_p90_abs_error": _p90(inp)}


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """Per group: files, how many reported usage, and the estimate's error against it (median
    and 90th percentile of |estimate / reported - 1|)."""
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    rows = []
    for group, rs in sorted(groups.items()):
        rows.append({
            "group": group, "files": len(rs),
            "with_usage": sum(1 for r in rs if r.reported_output is not None),
            **_errors(rs),
            "frame_errors": sum(r.frame_errors for r in rs),
        })
    return rows


def by_kind(results: list[Result]) -> list[dict[str, Any]]:
    """The same errors over all files, split into text, tool-call and reasoning streams."""
    kinds: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        kinds[r.kind].append(r)
    return [{"kind": k, "files": len(rs), **_errors(rs)}
            for k, rs in sorted(kinds.items())]


def render(results: list[Result], summary: list[dict[str, Any]],
           kinds: list[dict[str, Any]] | None = None) -> str:
    lines = [f"{'file':<58}{'dialect':<17}{'rep in':>8}{'est in':>8}{'rep out':>9}"
             f"{'est out':>9}{'out err':>9}{'cost USD':>12}"]
    for r in results:
        name = r.file if len(r.file) <= 57 else "…" + r.file[-56:]
        usd = "-" if r.cost_usd is None else f"{r.cost_usd:.6f}"
        lines.append(
            f"{name:<58}{r.dialect:<17}{_fmt(r.reported_input):>8}{_fmt(r.estimated_input):>8}"
            f"{_fmt(r.reported_output):>9}{r.estimated_output:>9}{_pct(r.output_ratio):>9}"
            f"{usd:>12}")
    lines += ["", "out err: estimate vs reported output minus reasoning the stream never showed",
              "p50, p90: of |estimate / reported - 1|, per folder and per stream kind (tool: "
              "tool-call text seen; reasoning: reasoning reported or seen)", "",
              f"{'provider (folder)':<20}{'files':>6}{'usage':>7}{'out p50':>9}{'out p90':>9}"
              f"{'in p50':>8}{'in p90':>8}{'frame errs':>12}"]
    for row in summary:
        lines.append(f"{row['group']:<20}{row['files']:>6}{row['with_usage']:>7}" + _cols(row)
                     + f"{row['frame_errors']:>12}")
    if kinds:
        lines += ["", f"{'stream kind':<20}{'files':>6}{'':>7}{'out p50':>9}{'out p90':>9}"
                      f"{'in p50':>8}{'in p90':>8}"]
        for row in kinds:
            lines.append(f"{row['kind']:<20}{row['files']:>6}{'':>7}" + _cols(row))
    return "\n".join(lines)


def _cols(row: dict[str, Any]) -> str:
    return (f"{_abs(row['output_estimate_median_abs_error']):>9}"
            f"{_abs(row['output_estimate_p90_abs_error']):>9}"
            f"{_abs(row['input_estimate_median_abs_error']):>8}"
            f"{_abs(row['input_estimate_p90_abs_error']):>8}")


def _fmt(v: int | None) -> str:
    return "-" if v is None else str(v)


def _abs(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def main(paths: list[str], *, as_json: bool = False, dialect: str | None = None,
         chunk: int = 0, out: TextIO | None = None,
         tokenizers_factory: Callable[[], Tokenizers] = Tokenizers,
         provider: str | None = None, model: str | None = None,
         prices_file: str | None = None) -> int:
    stream = out or sys.stdout
    files = collect(paths)
    if not files:
        print("sidecar replay: no stream files found", file=sys.stderr)
        return 2
    tokenizers = tokenizers_factory()
    book = price_book(path=prices_file)
    results = [replay_file(f, tokenizers, dialect, chunk, prices=book, provider=provider,
                           model=model) for f in files]
    summary = summarize(results)
    kinds = by_kind(results)
    if as_json:
        stream.write(orjson.dumps({"files": [asdict(r) for r in results], "summary": summary,
                                   "by_kind": kinds},
                                  option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        stream.write(render(results, summary, kinds) + "\n")
    return 0
