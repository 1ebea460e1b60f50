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

from .calibration import Calibration
from .dialects import get_dialect, provider_for
from .dialects.base import REASONING, TOOL, RequestInfo
from .meter import Meter
from .pricing import PROVIDER_IDS, UNLISTED, PriceBook, price_book, price_settlement
from .structure import (
    InputObservation,
    Observation,
    estimate,
    estimate_input,
    family_of,
    learn,
    learn_input,
    server_tools,
)
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
    family: str = "other"
    # The visible part's estimate (reasoning the stream never showed, or showed only as a
    # summary, left out of both sides): cold, as a fresh sidecar; warm, with what a sidecar
    # learned from the other captures of the same family (leave-one-out).
    estimated_visible: int | None = None
    estimated_output_warm: int | None = None
    # Why this capture's output cannot be estimated from its text (left out of the medians).
    unestimable: str | None = None
    answers: int = 0
    tool_calls: int = 0
    observation: Observation | None = None
    # What counted the text: an exact encoding ("o200k_base", "deepseek-v4", "tekken"...), or
    # an encoding under a family's estimation profile ("o200k_base/claude").
    tokenizer: str = ""
    # Input: warm as above; hidden_input says why the reported prompt holds what the request
    # never showed (server-side tools' results), and keeps the capture out of the medians.
    estimated_input_warm: int | None = None
    hidden_input: str | None = None
    input_observation: InputObservation | None = None

    @property
    def visible_output(self) -> int | None:
        if self.reported_output is None:
            return None
        return self.reported_output - self.hidden_reasoning

    def _ratio(self, estimate: int | None) -> float | None:
        visible = self.visible_output
        if estimate is None or not visible or visible <= 0 or self.unestimable:
            return None
        return estimate / visible

    @property
    def output_ratio(self) -> float | None:
        """Cold estimate / reported, over what the stream showed (hidden reasoning excluded)."""
        return self._ratio(self.estimated_visible)

    @property
    def output_ratio_warm(self) -> float | None:
        return self._ratio(self.estimated_output_warm)

    def _in_ratio(self, estimate: int | None) -> float | None:
        if self.reported_input and estimate is not None and not self.hidden_input:
            return estimate / self.reported_input
        return None

    @property
    def input_ratio(self) -> float | None:
        return self._in_ratio(self.estimated_input)

    @property
    def input_ratio_warm(self) -> float | None:
        return self._in_ratio(self.estimated_input_warm)


def provider_of(path: Path, dialect: str, given: str | None) -> str:
    """The provider label: given, else the folder's name when it is one (the shared fixture
    layout), else the format's default."""
    if given:
        return given
    folder = path.parent.name
    if folder in PROVIDER_IDS or folder in UNLISTED:
        return folder
    return provider_for(dialect, None)


def manifest_for(path: Path) -> dict[str, dict[str, Any]]:
    """Entries of the nearest MANIFEST.json above ``path`` (the shared fixture layout: a list
    of {"file", "model", "features", ...}), keyed by absolute file path; {} without one."""
    for folder in path.resolve().parents:
        found = folder / "MANIFEST.json"
        if found.exists():
            return _manifest(found)
    return {}


_manifests: dict[Path, dict[str, dict[str, Any]]] = {}


def _manifest(found: Path) -> dict[str, dict[str, Any]]:
    cached = _manifests.get(found)
    if cached is None:
        try:
            entries = orjson.loads(found.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            entries = []
        cached = {str((found.parent / e["file"]).resolve()): e for e in entries
                  if isinstance(e, dict) and isinstance(e.get("file"), str)}
        _manifests[found] = cached
    return cached


# Why a capture's reported output is not what its text shows (from MANIFEST features, or the
# model family): such captures are listed, not scored.
_UNESTIMABLE_FEATURES = {
    "truncated in source": "capture truncated: the recorded text is part of the stream",
    "compaction": "server-side compaction: the summary is output the stream never shows",
    "server tool use": "server-side tools: their calls and results are output not streamed",
}
_UNESTIMABLE_FAMILIES = {
    "sonar": "search: Perplexity bills search and citation work as output tokens",
}


def unestimable(entry: dict[str, Any] | None, family: str) -> str | None:
    features = entry.get("features") if entry else None
    for feature in features if isinstance(features, list) else []:
        if feature in _UNESTIMABLE_FEATURES:
            return _UNESTIMABLE_FEATURES[feature]
    return _UNESTIMABLE_FAMILIES.get(family)


def replay_file(path: Path, tokenizers: Tokenizers, dialect_name: str | None = None,
                chunk: int = 0, *, prices: PriceBook | None = None,
                provider: str | None = None, model: str | None = None) -> Result:
    data = path.read_bytes()
    sniffed, content_type = sniff(data, path.name)
    dialect = get_dialect(dialect_name or sniffed)
    request_path = path.with_name(path.name.rsplit(".", 1)[0] + ".request.json")
    req = request_path.read_bytes() if request_path.exists() else b""
    info = dialect.parse_request("/", "", req) if req else RequestInfo()
    listing = manifest_for(path).get(str(path.resolve()))
    if model:
        info.model = model
    listed = listing.get("model") if listing else None
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
    label = provider_of(path, dialect.name, provider)
    if info.model is None and not meter.model_name:
        # the recording's manifest names the model, or the provider implies the family
        named = listed or (label if family_of(label) != "other" else None)
        if named:
            meter = run(named)
            meter.model_name = meter.model_name or named
    elif info.model is None:
        meter = run(meter.model_name)  # the answer named the model: use its tokenizer
    s = meter.settle()
    obs = meter.observation()
    family = family_of(meter.model_name)
    r = meter.reported
    priced = None
    if prices is not None:
        entry = None
        for name in (s.model, info.model):
            entry = entry or prices.resolve(label, name)
        priced = price_settlement(prices, entry, s, label, time.time())
    return Result(
        file=str(path), group=path.parent.name, dialect=dialect.name, model=s.model,
        reported_input=r.input, reported_output=r.output,
        hidden_reasoning=meter.hidden_reasoning,
        estimated_input=s.estimated_input_tokens if info.body is not None else None,
        estimated_output=s.estimated_output_tokens, settled_input=s.input_tokens,
        settled_output=s.output_tokens, source=s.source, frame_errors=s.frame_errors,
        provider=label, kind=TOOL if TOOL in meter.kinds else (
            REASONING if REASONING in meter.kinds or r.reasoning else "text"),
        cost_usd=priced.usd if priced else None,
        price_source=priced.source if priced else None,
        priced_as=priced.priced_as if priced else None, family=family,
        estimated_visible=estimate(None, obs) if obs else None,
        unestimable=unestimable(listing, family) if r.output is not None else None,
        answers=meter.answers, tool_calls=meter.calls, observation=obs,
        tokenizer=meter.tokenizer.name if meter.tokenizer.exact
        else f"{meter.tokenizer.name}/{meter.tokenizer.profile.name}",
        hidden_input=hidden_input(info.body) if info.body is not None else None,
        input_observation=meter.input_observation())


def hidden_input(body: Any) -> str | None:
    tools = server_tools(body)
    if tools:
        return "server-side tools (" + ", ".join(sorted(set(tools))) + \
            "): their results are input the request never shows"
    return None


def warm(results: list[Result]) -> None:
    """Leave-one-out: each capture's estimate by a calibration that learned from every other
    capture of its family with reported usage (never from itself); cold where there is none."""
    by_family: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_family[r.family].append(r)
    for r in results:
        cal = Calibration()
        for other in by_family[r.family]:
            if other is r:
                continue
            if other.observation is not None and not other.unestimable:
                learn(cal, other.observation)
            if other.input_observation is not None and not other.hidden_input:
                learn_input(cal, other.input_observation)
        if r.observation is not None:
            r.estimated_output_warm = estimate(cal, r.observation)
        if r.input_observation is not None:
            r.estimated_input_warm = estimate_input(cal, r.input_observation)
        elif r.estimated_input is not None:
            r.estimated_input_warm = r.estimated_input


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
    warm_ = [abs(r.output_ratio_warm - 1) for r in rs if r.output_ratio_warm is not None]
    inp = [abs(r.input_ratio - 1) for r in rs if r.input_ratio is not None]
    inp_warm = [abs(r.input_ratio_warm - 1) for r in rs if r.input_ratio_warm is not None]
    return {"output_estimate_median_abs_error": median(out) if out else None,
            "output_estimate_p90_abs_error": _p90(out),
            "output_estimate_warm_median_abs_error": median(warm_) if warm_ else None,
            "output_estimate_warm_p90_abs_error": _p90(warm_),
            "input_estimate_median_abs_error": median(inp) if inp else None,
            "input_estimate_p90_abs_error": _p90(inp),
            "input_estimate_warm_median_abs_error": median(inp_warm) if inp_warm else None,
            "input_estimate_warm_p90_abs_error": _p90(inp_warm)}


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
            "unestimable": {Path(r.file).name: r.unestimable for r in rs if r.unestimable},
            "hidden_input": {Path(r.file).name: r.hidden_input for r in rs if r.hidden_input},
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
             f"{'est out':>9}{'out err':>9}{'warm err':>9}{'cost USD':>12}"]
    for r in results:
        name = r.file if len(r.file) <= 57 else "…" + r.file[-56:]
        usd = "-" if r.cost_usd is None else f"{r.cost_usd:.6f}"
        lines.append(
            f"{name:<58}{r.dialect:<17}{_fmt(r.reported_input):>8}{_fmt(r.estimated_input):>8}"
            f"{_fmt(r.reported_output):>9}{r.estimated_output:>9}{_pct(r.output_ratio):>9}"
            f"{_pct(r.output_ratio_warm):>9}{usd:>12}")
    lines += ["", "out err: estimate vs reported output, both without reasoning the stream never "
              "showed (or showed only as a summary); cold: a fresh sidecar; warm: after learning "
              "from the other captures of the model family (leave-one-out)",
              "p50, p90: of |estimate / reported - 1|, per folder and per stream kind (tool: "
              "tool-call text seen; reasoning: reasoning reported or seen)", "",
              f"{'provider (folder)':<20}{'files':>6}{'usage':>7}{'out p50':>9}{'out p90':>9}"
              f"{'warm p50':>9}{'warm p90':>9}{'in p50':>8}{'in p90':>8}{'warm p50':>9}"
              f"{'warm p90':>9}{'frame errs':>12}"]
    for row in summary:
        lines.append(f"{row['group']:<20}{row['files']:>6}{row['with_usage']:>7}" + _cols(row)
                     + f"{row['frame_errors']:>12}")
    if kinds:
        lines += ["", f"{'stream kind':<20}{'files':>6}{'':>7}{'out p50':>9}{'out p90':>9}"
                      f"{'warm p50':>9}{'warm p90':>9}{'in p50':>8}{'in p90':>8}"
                      f"{'warm p50':>9}{'warm p90':>9}"]
        for row in kinds:
            lines.append(f"{row['kind']:<20}{row['files']:>6}{'':>7}" + _cols(row))
    skipped = [r for r in results if r.unestimable]
    if skipped:
        lines += ["", "not scored (the reported output counts what the stream never shows):"]
        lines += [f"  {Path(r.file).name}: {r.unestimable}" for r in skipped]
    hidden = [r for r in results if r.hidden_input]
    if hidden:
        lines += ["", "input not scored (hidden_input):"]
        lines += [f"  {Path(r.file).name}: {r.hidden_input}" for r in hidden]
    return "\n".join(lines)


def _cols(row: dict[str, Any]) -> str:
    return (f"{_abs(row['output_estimate_median_abs_error']):>9}"
            f"{_abs(row['output_estimate_p90_abs_error']):>9}"
            f"{_abs(row['output_estimate_warm_median_abs_error']):>9}"
            f"{_abs(row['output_estimate_warm_p90_abs_error']):>9}"
            f"{_abs(row['input_estimate_median_abs_error']):>8}"
            f"{_abs(row['input_estimate_p90_abs_error']):>8}"
            f"{_abs(row['input_estimate_warm_median_abs_error']):>9}"
            f"{_abs(row['input_estimate_warm_p90_abs_error']):>9}")


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
    warm(results)
    summary = summarize(results)
    kinds = by_kind(results)
    if as_json:
        stream.write(orjson.dumps({"files": [asdict(r) for r in results], "summary": summary,
                                   "by_kind": kinds},
                                  option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        stream.write(render(results, summary, kinds) + "\n")
    return 0
