"""`kvcellar bench SUITE [options]`: the focused suites' command-line options and how a run starts.

Operations: `add_bench_suites(bench_parser)`. Each suite's options default to None here: its frozen
config (bench/suites/) holds the defaults, shown in --help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _cmd_bench_suite(args: argparse.Namespace) -> int:
    """`kvcellar bench SUITE ...`: the suite's config from the options given (the others keep its defaults)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(args.suite_config)}
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}
    if "command" in fields:
        given["command"] = "kvcellar " + " ".join(sys.argv[1:])
    args.suite_run(args.suite_config(**given))
    return 0


def _token_counts(text: str) -> tuple[int, ...]:
    """"2048,8K" -> (2048, 8192), for the suites' --lengths and --chunks."""
    from kvcellar.bench import parse_lengths

    try:
        return parse_lengths(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"write token counts separated by commas, e.g. 2048,8192 or 2K,8K (got {text!r})") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_bench_suites(bench: argparse.ArgumentParser) -> None:
    """`kvcellar bench SUITE [options]`: sub-commands, because no suite shares the scenario bench's options.

    Every option defaults to None here: the suite's frozen config holds the defaults (shown in --help).
    """
    import dataclasses

    from kvcellar.bench.suites import (chunking, cluster, concurrent, disk_tier, gguf_dtypes, prefix_cache,
                                      side_by_side, structured)  # fmt: skip

    suites = bench.add_subparsers(dest="suite", metavar="SUITE", title="suites (options go after the suite's name; "
                                  "without a suite: the scenario bench, options above)")  # fmt: skip

    def suite(module: object, config: type, text: str) -> tuple[argparse.ArgumentParser, Callable[[str], str]]:
        name = module.__name__.rsplit(".", 1)[1].replace("_", "-")
        parser = suites.add_parser(name, help=text, description=text)
        parser.set_defaults(handler=_cmd_bench_suite, suite_config=config, suite_run=module.run)
        defaults = {f.name: f.default for f in dataclasses.fields(config)}

        def default(field: str) -> str:
            value = defaults[field]
            return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

        return parser, default

    model_help = "model folder (default: the bench's random-weight Qwen3-0.6B-shape folder, made on first use)"
    p, d = suite(prefix_cache, prefix_cache.PrefixCacheConfig,
                 "cold vs cached TTFT, chunking overhead and per-request peak RSS on CPU (3 fresh processes per length)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--lengths", type=_token_counts, help=f"prompt lengths in tokens (default {d('lengths')})")
    p.add_argument("--block-size", type=int, help=f"cache block in tokens (default {d('block_size')})")
    p.add_argument("--out", help=f"JSON file (default {d('out')})")

    p, d = suite(disk_tier, disk_tier.DiskTierConfig,
                 "disk tier on CPU: restart hit, restore vs raw read bandwidth, miss-only p99 with the tier on / off")
    p.add_argument("--model", help=model_help)
    p.add_argument("--length", type=int, help=f"restart-hit prompt length in tokens (default {d('length')})")
    p.add_argument("--block-size", type=int, help=f"cache block in tokens (default {d('block_size')})")
    p.add_argument("--miss-prompts", type=int, help=f"distinct prompts per setting, a multiple of 4 (default {d('miss_prompts')})")
    p.add_argument("--work-dir", help="folder for the cache directories (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", default=None, help="keep the cache directories")
    p.add_argument("--only-miss", action="store_true", default=None, help="run only the miss-only part")
    p.add_argument("--out", help=f"JSON file (default {d('out')})")

    p, d = suite(chunking, chunking.ChunkingConfig,
                 "one-pass vs chunked cold prefill on the bare model, interleaved in one process")
    p.add_argument("--model", help=model_help)
    p.add_argument("--lengths", type=_token_counts, help=f"prompt lengths in tokens (default {d('lengths')})")
    p.add_argument("--block-size", type=int, help=f"cache block in tokens (default {d('block_size')})")
    p.add_argument("--chunks", type=_token_counts, help=f"prefill chunk sizes, multiples of the block (default {d('chunks')})")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {d('rounds')})")
    p.add_argument("--out", help=f"JSON file (default {d('out')})")

    p, d = suite(gguf_dtypes, gguf_dtypes.GgufDtypesConfig,
                 "a GGUF file per dtype: conversion, later loads, RSS, cold prefill and decode (a fresh process each)")
    p.add_argument("--model", help="a .gguf file (default: the demo model's)")
    p.add_argument("--dtypes", type=_names, help=f"dtypes to compare (default {d('dtypes')})")
    p.add_argument("--length", type=int, help=f"cold prompt length in tokens (default {d('length')})")
    p.add_argument("--out", help=f"JSON file (default {d('out')})")

    p, d = suite(side_by_side, side_by_side.SideBySideConfig,
                 "kvcellar and peer servers (scripts/peers/) on the same token-id prompts over HTTP")
    _http_suite_options(p, d, "a server (repeat, at least two; the first is the one compared)")
    p.add_argument("--length", type=int, help=f"prompt tokens (default {d('length')})")
    p.add_argument("--rounds", type=int, help=f"rounds, alternating which server goes first (default {d('rounds')})")
    p.add_argument("--decode-tokens", type=int, help=f"tokens of the decode row (default {d('decode_tokens')})")

    p, d = suite(concurrent, concurrent.ConcurrentConfig,
                 "many clients at once (shared system prompt, own questions, optional turns) against servers over HTTP")
    _http_suite_options(p, d, "a server (repeat to compare; each gets the same workload)")
    p.add_argument("--clients", type=_token_counts, help=f"client counts to run (default {d('clients')})")
    p.add_argument("--system-tokens", type=int, help=f"shared system prompt tokens (default {d('system_tokens')})")
    p.add_argument("--question-tokens", type=int, help=f"each question's tokens (default {d('question_tokens')})")
    p.add_argument("--decode-tokens", type=int, help=f"tokens per answer (default {d('decode_tokens')})")
    p.add_argument("--turns", type=int, help=f"turns per client, each resending the conversation (default {d('turns')})")
    p.add_argument("--probe-under", type=int, help=f"streams decoding during the TTFT probe, 0: no probe "
                                                   f"(default {d('probe_under')})")  # fmt: skip
    p.add_argument("--probe-tokens", type=int, help=f"the probe prompt's tokens (default {d('probe_tokens')})")

    p, d = suite(structured, structured.StructuredConfig,
                 "constrained decoding (JSON Schema, forced tool calls) against free decoding, per generated token")
    p.add_argument("--model", help=model_help)
    p.add_argument("--prompt-tokens", type=int, help=f"prompt tokens (default {d('prompt_tokens')})")
    p.add_argument("--max-tokens", type=int, help=f"most tokens per answer (default {d('max_tokens')})")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {d('rounds')})")
    p.add_argument("--out", help=f"JSON file (default {d('out')})")

    p, d = suite(cluster, cluster.ClusterBenchConfig,
                 "servers sharing one Redis behind a cache-aware router vs servers sharing nothing, round robin")
    p.add_argument("--model", help=model_help)
    p.add_argument("--replicas", type=int, help=f"servers per setup (default {d('replicas')})")
    p.add_argument("--conversations", type=int, help=f"conversations per setup and round (default {d('conversations')})")
    p.add_argument("--clients", type=int, help=f"conversations at a time (default {d('clients')})")
    p.add_argument("--turns", type=int, help=f"turns per conversation (default {d('turns')})")
    p.add_argument("--system-tokens", type=int, help=f"the shared system prompt's tokens (default {d('system_tokens')})")
    p.add_argument("--question-tokens", type=int, help=f"each question's tokens (default {d('question_tokens')})")
    p.add_argument("--decode-tokens", type=int, help=f"tokens per answer (default {d('decode_tokens')})")
    p.add_argument("--rounds", type=int, help=f"rounds, alternating which setup goes first (default {d('rounds')})")
    p.add_argument("--threads", type=int, help=f"CPU threads per server (default {d('threads')})")
    p.add_argument("--block-size", type=int, help="cache block in tokens (default: the server's)")
    p.add_argument("--device-cache-size", help=f"each server's memory tier (default {d('device_cache_size')})")
    p.add_argument("--kv-budget", help=f"each server's running K/V memory (default {d('kv_budget')})")
    p.add_argument("--redis-maxmemory", help=f"the shared store's maxmemory (default {d('redis_maxmemory')})")
    p.add_argument("--bandwidth-rounds", type=int, help=f"restore bandwidth rounds (default {d('bandwidth_rounds')})")
    _prompt_options(p, d)


def _http_suite_options(p: argparse.ArgumentParser, d: Callable[[str], str], target_help: str) -> None:
    """The options of the suites that drive servers over HTTP: targets, prompt ids, seed, output."""
    from kvcellar.bench.suites.side_by_side import parse_target

    p.add_argument("--target", dest="targets", action="append", type=parse_target, required=True, metavar="NAME=URL",
                   help=target_help)
    _prompt_options(p, d)


def _prompt_options(p: argparse.ArgumentParser, d: Callable[[str], str]) -> None:
    """The options of the suites that send seeded token-id prompts: id range, seed, output."""
    p.add_argument("--max-token-id", type=int, help=f"prompt ids are drawn from [100, this) (default {d('max_token_id')})")
    p.add_argument("--seed", type=int, help="prompt seed (default: the clock, recorded)")
    p.add_argument("--out", help=f"JSON file (default {d('out')})")
