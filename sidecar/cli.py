"""Command line: `sidecar run|demo|replay|price|prices-update|health|top`.

Each `run` flag has an environment variable twin."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .config import OPTIONS, ConfigError, load_settings, parse_hostport

# Flags of `run`, mapped to the Settings attribute and its env var (see config.OPTIONS).
_RUN_FLAGS = {opt.attr: opt for opt in OPTIONS}

# The serving process's garbage collector. A whole answer's request body is parsed (what agents
# send is 20-200 KB of JSON: thousands of objects); with CPython's first threshold of 700, each
# such request sets off young collections that promote the live body, and the older
# generations' collections that follow walk the whole heap (the tokenizers, the price data).
# At 20,000 a request's objects die by reference count before a collection sees them: -70 us
# of CPU per agent-shaped request, the same for one-line ones (docs/PERFORMANCE.md, seventh
# stop). Objects in reference cycles wait at most 20,000 allocations longer.
GC_THRESHOLD = (20_000, 10, 10)


def tune_gc() -> None:
    """The serving process's collector thresholds (GC_THRESHOLD), never lowered."""
    import gc

    gc.set_threshold(*(max(a, b) for a, b in zip(gc.get_threshold(), GC_THRESHOLD,
                                                   strict=True)))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar",
        description="Transparent reverse proxy that meters LLM tokens live and exports them "
                    "to Prometheus.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run the proxy in front of an upstream",
        description="Run the proxy. Each flag can also be set by the environment variable "
                    "shown, or in the YAML --config file. Precedence: flag > env > file.")
    run.add_argument("--config", metavar="FILE", help="YAML config file (env SIDECAR_CONFIG)")
    for attr, opt in _RUN_FLAGS.items():
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if opt.switch else {}
        run.add_argument(f"--{attr.replace('_', '-')}", dest=attr, metavar=attr.upper(),
                         help=f"{opt.help} (env {opt.env}; file key {opt.file_key})".replace(
                             "%", "%%"), **extra)

    demo = sub.add_parser(
        "demo", help="mock upstream + sidecar + traffic + live view; no key, no network",
        description="Start a built-in OpenAI-compatible mock upstream (chat streams, and "
                    "Realtime voice sessions over WebSocket), the sidecar in front of it and a "
                    "little traffic, and show live token counts per model.")
    demo.add_argument("--duration", type=float, default=20.0,
                      help="seconds to run, 0 = until Ctrl-C (default 20)")
    demo.add_argument("--workers", type=int, default=4, help="concurrent clients (default 4)")
    demo.add_argument("--pace", type=float, default=0.04,
                      help="seconds between streamed chunks (default 0.04)")
    demo.add_argument("--listen", default="127.0.0.1:0", help="proxy address (default: any port)")
    demo.add_argument("--metrics-listen", default="127.0.0.1:0",
                      help="metrics address (default: any port)")
    demo.add_argument("--records", default="off",
                      help="per-request JSON lines: '-' stderr, a file path, or 'off' (default)")

    replay = sub.add_parser(
        "replay", help="meter recorded streams offline: estimated vs reported tokens",
        description="Run recorded streams (SSE, NDJSON, JSON array or AWS event-stream files, or "
                    "folders of them) through the same meter as the proxy, and print estimated "
                    "versus reported tokens per file and an accuracy summary per folder and per "
                    "stream kind, output and input, cold (a fresh sidecar) and warm (learned from "
                    "the other captures of the same model family, leave-one-out). A request body "
                    "is read from NAME.request.json beside a stream, and models and features from "
                    "a MANIFEST.json above it, when present. docs/ACCURACY.md explains the "
                    "figures.")
    replay.add_argument("files", nargs="+", metavar="FILE", help="stream files or folders")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.add_argument("--dialect", default=None,
                        help="force a dialect instead of sniffing it from the bytes")
    replay.add_argument("--provider", default=None,
                        help="provider label for prices (default: the folder's name when it "
                             "is a provider, else the format's)")
    replay.add_argument("--model", default=None,
                        help="model to tokenize and price by when a capture names none")
    replay.add_argument("--prices-file", default=None,
                        help="price data file instead of the bundled snapshot")
    replay.add_argument("--chunk", type=int, default=0,
                        help="feed the meter N bytes at a time (default: whole file)")

    price = sub.add_parser(
        "price", help="a model's price schedule, and the cost of some usage",
        description="Look a model up in the price data (the bundled genai-prices snapshot, or "
                    "--prices-file) and print its schedule; with --input/--output/..., the "
                    "cost of that usage. Exit status 1 when the model is unpriced.")
    price.add_argument("model")
    price.add_argument("--provider", default=None,
                       help="provider label (openai, anthropic, gemini, bedrock, azure-openai, "
                            "...); default: any provider whose model names match")
    for flag, help_ in (("input", "input tokens (cached ones included)"),
                        ("output", "output tokens (reasoning included)"),
                        ("cached-input", "cache reads (part of --input)"),
                        ("cache-write", "cache writes (part of --input)"),
                        ("cache-write-1h", "1-hour cache writes (part of --cache-write)"),
                        ("web-searches", "server-side web searches")):
        price.add_argument(f"--{flag}", type=int, default=0, help=help_)
    price.add_argument("--service-tier", default=None,
                       help="service tier of the answer (flex, priority, ...)")
    price.add_argument("--prices-file", default=None, help="price data file to use")
    price.add_argument("--json", action="store_true", help="machine-readable output")

    update = sub.add_parser(
        "prices-update", help="download newer price data from genai-prices (opt-in network)",
        description="Fetch genai-prices' data.json, check that it loads, and write it to --out. "
                    "The sidecar never fetches prices by itself; point prices_file at the "
                    "result and reload.")
    update.add_argument("--out", required=True, help="file to write")
    update.add_argument("--url", default=None, help="source URL (default: genai-prices' own)")

    toks = sub.add_parser(
        "tokenizers", help="the open models' tokenizers: installed, verified, memory",
        description="List the open-model vocabularies the tokenizers extra provides (DeepSeek, "
                    "Qwen, Mistral): the package each comes from and whether it is installed. "
                    "With --load, load each one (SHA-256 checked) and print the time it took and "
                    "the resident memory it added; exit 1 when one could not be loaded.")
    toks.add_argument("--load", action="store_true", help="load each one and measure it")
    toks.add_argument("--json", action="store_true", help="machine-readable output")

    health = sub.add_parser(
        "health", help="exit 0 when the local sidecar answers /healthz (a container HEALTHCHECK)",
        description="GET /healthz on the metrics listener named by SIDECAR_METRICS_LISTEN (or "
                    "--metrics-listen); exit status 0 when it answers 200, else 1.")
    health.add_argument("--metrics-listen", default=None,
                        help="HOST:PORT of the metrics listener (default: SIDECAR_METRICS_LISTEN "
                             "or 0.0.0.0:9464; 0.0.0.0 is asked on 127.0.0.1)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")

    top = sub.add_parser("top", help="terminal dashboard for a running sidecar",
                         description="Poll a sidecar's /metrics and show live tokens per model.")
    top.add_argument("--metrics", default="http://127.0.0.1:9464/metrics",
                     help="metrics URL (default http://127.0.0.1:9464/metrics)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--iterations", type=int, default=None, help="stop after N refreshes")
    return p


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for (or 'auto' and installed); None means asyncio's own loop."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise SystemExit("sidecar: event_loop uvloop needs 'pip install uvloop'") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _health(listen: str | None, timeout: float) -> int:
    import os
    import urllib.request

    try:
        host, port = parse_hostport(listen or os.environ.get("SIDECAR_METRICS_LISTEN")
                                    or "0.0.0.0:9464")
    except ValueError as exc:
        print(f"sidecar health: {exc}", file=sys.stderr)
        return 2
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: no proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"sidecar health: {url}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "run":
        flags = {attr: getattr(args, attr) for attr in _RUN_FLAGS}
        try:
            settings = load_settings(args.config, flags=flags)
        except ConfigError as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            return 2
        import os

        worker = os.environ.get("SIDECAR_WORKER_INDEX")
        prefix = f"worker {worker} " if worker is not None else ""
        logging.basicConfig(level=settings.log_level,
                            format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        if settings.workers > 1 and worker is None:
            from .workers import supervise

            raw = list(argv if argv is not None else sys.argv[1:])
            try:
                with asyncio.Runner() as runner:
                    runner.run(supervise(settings, raw[raw.index("run") + 1:], flags))
            except KeyboardInterrupt:
                pass
            return 0
        from .app import serve

        tune_gc()
        try:
            with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
                runner.run(serve(settings, flags))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "demo":
        logging.basicConfig(level="WARNING")
        try:
            listen = parse_hostport(args.listen)
            metrics_listen = parse_hostport(args.metrics_listen)
        except ValueError as exc:
            print(f"sidecar demo: --listen/--metrics-listen: {exc}", file=sys.stderr)
            return 2
        from .demo import run_demo

        try:
            asyncio.run(run_demo(args.duration, args.workers, args.pace, listen, metrics_listen,
                                 args.records))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "replay":
        from .replay import main as replay_main

        return replay_main(args.files, as_json=args.json, dialect=args.dialect, chunk=args.chunk,
                           provider=args.provider, model=args.model,
                           prices_file=args.prices_file)
    if args.command == "price":
        from .price_cli import price_main

        usage = {key: n for key, n in (
            ("input_tokens", args.input), ("output_tokens", args.output),
            ("cache_read_tokens", args.cached_input), ("cache_write_tokens", args.cache_write),
            ("cache_write_1h_tokens", args.cache_write_1h),
            ("web_searches", args.web_searches)) if n}
        return price_main(args.model, provider=args.provider, usage=usage, as_json=args.json,
                          service_tier=args.service_tier, prices_file=args.prices_file)
    if args.command == "prices-update":
        from .price_cli import UPDATE_URL, update_main

        return update_main(args.out, args.url or UPDATE_URL)
    if args.command == "tokenizers":
        return _tokenizers(args.load, args.json)
    if args.command == "health":
        return _health(args.metrics_listen, args.timeout)
    if args.command == "top":
        from .top import run_top

        try:
            asyncio.run(run_top(args.metrics, args.interval, args.iterations))
        except KeyboardInterrupt:
            pass
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


def _tokenizers(load: bool, as_json: bool) -> int:
    import orjson

    from . import open_tokenizers as ot

    rows, failed = [], False
    for source in ot.SOURCES.values():
        row: dict[str, object] = {"name": source.name, "package": source.distribution,
                                  "file": source.path, "sha256": source.sha256,
                                  "installed": ot.installed(source)}
        if load:
            try:
                ot.get(source)
                info = ot.loaded[source.name]
                row.update(loaded=True, seconds=round(info.seconds, 3),
                           rss_mb=round(info.rss_bytes / 1e6, 1))
            except ot.Unavailable as exc:
                failed = True
                row.update(loaded=False, error=str(exc))
        rows.append(row)
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    else:
        for row in rows:
            state = "installed" if row["installed"] else "not installed"
            if load:
                state = (f"loaded in {row['seconds']} s, +{row['rss_mb']} MB RSS"
                         if row.get("loaded") else f"NOT LOADED: {row['error']}")
            print(f"{row['name']:<13}{row['package']:<28}{state}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
