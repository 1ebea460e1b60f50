"""Print docs/ACCURACY.md's tables from `sidecar replay --json` output.

    .venv/bin/python -m sidecar replay --json ../shared/fixtures/streams > replay.json
    .venv/bin/python scripts/accuracy_tables.py replay.json
"""

from __future__ import annotations

import json
import sys
from typing import Any


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def row(label: str, r: dict[str, Any]) -> str:
    cols = [r[f"{side}_estimate{warm}_{stat}_abs_error"]
            for side in ("output", "input") for warm in ("", "_warm") for stat in ("median", "p90")]
    return f"| {label} | {r['files']} | " + " | ".join(pct(c) for c in cols) + " |"


def main(path: str) -> None:
    d = json.load(open(path))
    head = ("| {} | captures | out p50 cold | out p90 cold | out p50 warm | out p90 warm "
            "| in p50 cold | in p90 cold | in p50 warm | in p90 warm |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(head.format("provider (folder)"))
    for r in d["summary"]:
        print(row(r["group"], r))
    print()
    print(head.format("stream kind"))
    for r in d["by_kind"]:
        print(row(r["kind"], r))
    print()
    print("| capture | kind | output reported (visible) | cold | warm | input reported | cold "
          "| warm |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for f in d["files"]:
        name = f["file"].split("streams/", 1)[-1]
        rep = "-"
        if f["reported_output"] is not None:
            rep = str(f["reported_output"])
            if f["hidden_reasoning"]:
                rep += f" ({f['reported_output'] - f['hidden_reasoning']})"
        marks = (" (a)" if f["unestimable"] else "") + (" (b)" if f["hidden_input"] else "")

        def v(x: int | None) -> str:
            return "-" if x is None else str(x)

        print(f"| {name}{marks} | {f['kind']} | {rep} | {v(f['estimated_visible'])} "
              f"| {v(f['estimated_output_warm'])} | {v(f['reported_input'])} "
              f"| {v(f['estimated_input'])} | {v(f['estimated_input_warm'])} |")


if __name__ == "__main__":
    main(sys.argv[1])
