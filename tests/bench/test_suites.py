"""`kvcellar bench SUITE`: argument handling, the suites' arithmetic, and the JSON the docs link to.

The suites time things, so nothing here checks a figure a run measured; the
arithmetic is checked on hand-made samples and one tiny run checks the shape
of the JSON against the files in docs/bench/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcellar.bench.suites import (SUITES, chunking, cluster, concurrent, disk_tier, gguf_dtypes, prefix_cache,
                                   side_by_side)
from kvcellar.bench.suites.fresh_process import run_in_fresh_process
from kvcellar.cli import build_parser, main

DOCS_BENCH = Path(__file__).resolve().parents[2] / "docs" / "bench"
MODULES = {"prefix-cache": prefix_cache, "disk-tier": disk_tier, "chunking": chunking, "gguf-dtypes": gguf_dtypes,
           "side-by-side": side_by_side, "concurrent": concurrent, "cluster": cluster}  # fmt: skip


@pytest.fixture
def captured(monkeypatch) -> list:
    """Each suite's `run` replaced by one that records the config it was given."""
    configs: list = []
    for module in MODULES.values():
        monkeypatch.setattr(module, "run", configs.append)
    return configs


def test_every_suite_is_a_subcommand_of_bench():
    assert set(MODULES) == set(SUITES)
    for name in SUITES:
        args = build_parser().parse_args(["bench", name] + (["--target", "a=http://h:1", "--target", "b=http://h:2"]
                                                            if name in ("side-by-side", "concurrent") else []))  # fmt: skip
        assert args.suite == name and args.suite_run is MODULES[name].run


def test_options_become_the_suites_config(captured):
    assert main(["bench", "prefix-cache", "--lengths", "2K,8K", "--block-size", "512", "--out", "o.json"]) == 0
    assert main(["bench", "disk-tier", "--length", "1024", "--miss-prompts", "8", "--only-miss", "--keep"]) == 0
    assert main(["bench", "chunking", "--chunks", "256,1024", "--rounds", "5", "--model", "m"]) == 0
    assert main(["bench", "gguf-dtypes", "--dtypes", "float32", "--length", "512"]) == 0
    assert main(["bench", "side-by-side", "--target", "kvcellar=http://127.0.0.1:8000", "--target",
                 "llama.cpp=http://127.0.0.1:8001", "--rounds", "1", "--seed", "7"]) == 0  # fmt: skip
    prefix, disk, chunks, gguf, side = captured
    assert prefix == prefix_cache.PrefixCacheConfig(lengths=(2048, 8192), block_size=512, out="o.json")
    assert disk == disk_tier.DiskTierConfig(length=1024, miss_prompts=8, only_miss=True, keep=True)
    assert chunks.chunks == (256, 1024) and chunks.rounds == 5 and chunks.model == "m" and chunks.lengths == (2048, 8192)
    assert chunks.command.startswith("kvcellar ")  # recorded in the JSON
    assert gguf == gguf_dtypes.GgufDtypesConfig(dtypes=("float32",), length=512)
    assert side.targets == (("kvcellar", "http://127.0.0.1:8000"), ("llama.cpp", "http://127.0.0.1:8001"))
    assert (side.rounds, side.seed, side.length) == (1, 7, 2048)


def test_no_option_gives_the_config_defaults(captured):
    assert main(["bench", "disk-tier"]) == 0
    assert main(["bench", "prefix-cache"]) == 0
    assert captured == [disk_tier.DiskTierConfig(), prefix_cache.PrefixCacheConfig()]


@pytest.mark.parametrize(("argv", "message"), [
    (["disk-tier", "--miss-prompts", "6"], "multiple of 4"),
    (["disk-tier", "--length", "100", "--block-size", "256"], "at least one block"),
    (["chunking", "--chunks", "300"], "multiples of the block size"),
    (["chunking", "--rounds", "0"], "--rounds must be >= 1"),
    (["prefix-cache", "--lengths", "64"], "at least one block"),
    (["gguf-dtypes", "--model", "folder"], "must be a .gguf file"),
    (["gguf-dtypes", "--dtypes", "int4"], "--dtypes must list"),
    (["side-by-side", "--target", "a=http://h:1", "--target", "a=http://h:2"], "names must differ"),
    (["side-by-side", "--target", "a=http://h:1", "--target", "b=http://h:2", "--decode-tokens", "1"], ">= 2"),
])  # fmt: skip
def test_bad_options_are_refused_with_what_to_do(captured, capsys, argv, message):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
    assert captured == []


def test_side_by_side_needs_two_targets(captured, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "side-by-side", "--target", "kvcellar"])  # not NAME=URL: argparse refuses it
    assert main(["bench", "side-by-side", "--target", "a=http://h:1"]) == 2
    assert "at least two --target" in capsys.readouterr().err


def test_the_scenario_bench_still_runs_without_a_suite():
    args = build_parser().parse_args(["bench", "--quick", "--modes", "no-cache"])
    assert args.suite is None and args.handler.__name__ == "_cmd_bench"


def test_disk_tier_p99_and_miss_summary():
    rows = {d: [{"prompt": i, "ttft_s": t, "wall_s": t + 0.5, "cpu_util": 1.9} for i, t in enumerate(ts)]
            for d, ts in (("on", [1.0, 2.0, 3.0, 4.0]), ("off", [1.0, 2.0, 3.0, 2.0]))}  # fmt: skip
    m = disk_tier.miss_summary(rows, {"on": 1, "off": 0})
    assert disk_tier.p99([1.0, 2.0, 3.0, 4.0]) == pytest.approx(3.97)  # numpy's linear interpolation
    assert m["on"]["ttft_s_p50"] == 2.5 and m["on"]["drops"] == 1
    assert m["p99_ratio_ttft"] == pytest.approx(3.97 / 2.97)
    assert m["paired_median_ratio_wall"] == pytest.approx(1.0)  # ratios 1, 1, 1, 4.5/2.5
    only = disk_tier.summarise(None, None, rows, {"on": 0, "off": 0})
    assert set(only) == {"miss", "targets"} and only["targets"] == {"miss_p99_le_1.05": False}


def test_prefix_cache_budget_is_load_plus_cache_plus_the_pools_longest_request():
    phase = {"rss_load_mib": 1000.0, "rss_warm_mib": 1010.0, "kv_bytes_per_token": 1024**2 // 4}
    rows = [{"peak_mib": 1200.0, "cache_mib": 100.0, "pool_tokens": 256, "rss_before_mib": 1190.0},
            {"peak_mib": 1150.0, "cache_mib": 100.0, "pool_tokens": 128, "rss_before_mib": 1150.0}]
    worst = prefix_cache.worst_over_budget(phase, rows)
    assert worst["budget_mib"] == 1000 + 100 + 64  # 256 tokens of 1/4 MiB
    assert worst["over_budget_mib"] == 36 and worst["over_warm_budget_mib"] == 26
    assert worst["peak_minus_before_mib"] == 10 and worst["kv_tokens"] == 256


def test_only_suite_functions_run_in_a_fresh_process():
    with pytest.raises(ValueError, match="not a suite phase"):
        run_in_fresh_process(json.dumps, {})


def test_prefix_cache_suite_writes_the_json_the_docs_link_to(tiny_model_dirs, tmp_path):
    """A tiny run (3 fresh processes): the same keys as the run in docs/bench/, so its readers keep working."""
    out = tmp_path / "prefix_cache.json"
    prefix_cache.run(prefix_cache.PrefixCacheConfig(model=str(tiny_model_dirs["qwen3"]), lengths=(32,), block_size=16,
                                                    out=str(out)))  # fmt: skip
    new = json.loads(out.read_text())
    old = json.loads((DOCS_BENCH / "cpu-epyc-zen4" / "prefix_cache.json").read_text())
    assert set(new) == set(old)
    assert set(new["summary"]["32"]) == set(old["summary"]["2048"])
    assert set(new["summary"]["32"]["modes"]["exact"]) == set(old["summary"]["2048"]["modes"]["exact"])
    assert set(new["raw"]["32"]["exact"]["hits"][0]) == set(old["raw"]["2048"]["exact"]["hits"][0])
    hits = new["raw"]["32"]["exact"]["hits"]
    assert [h["num_cached_tokens"] for h in hits] == [32, 32, 32]  # an exact repeat is served whole


def test_chunking_suite_compares_every_variant_with_one_pass(tiny_model_dirs, tmp_path):
    out = tmp_path / "chunking.json"
    chunking.run(chunking.ChunkingConfig(model=str(tiny_model_dirs["qwen3"]), lengths=(64,), block_size=16,
                                         chunks=(16, 32), rounds=2, out=str(out)))  # fmt: skip
    new = json.loads(out.read_text())
    old = json.loads((DOCS_BENCH / "cpu-epyc-zen4" / "chunking-2k.json").read_text())
    assert set(new) == set(old)
    results = new["results"]["64"]
    assert list(results) == ["one pass", "chunk 16", "chunk 32"]
    assert results["one pass"]["vs_one_pass"] == 1.0 and all(len(r["runs_s"]) == 2 for r in results.values())


def test_token_counts_take_k_suffixes_and_refuse_words(captured, capsys):
    assert main(["bench", "chunking", "--lengths", "1K,4k", "--chunks", "256"]) == 0
    assert captured[0].lengths == (1024, 4096) and captured[0].chunks == (256,)
    with pytest.raises(SystemExit):
        main(["bench", "prefix-cache", "--lengths", "two"])
    assert "write token counts separated by commas" in capsys.readouterr().err


def test_side_by_side_table_writes_tiny_ratios_as_how_many_times_less():
    rounds = [{"a": {"cold": 1.0, "exact repeat": 0.004, "extension": 1.2, "shared 3/4": 1.0, "decode": 4.0},
               "b": {"cold": 2.0, "exact repeat": 8.0, "extension": 1.2, "shared 3/4": 1.0, "decode": 8.0}}]  # fmt: skip
    table = side_by_side.table_text(["a", "b"], rounds, 2048)
    assert "| cold | 1.000 s" in table and "| 0.50x |" in table
    assert "| 2000x less |" in table  # 0.004 / 8: not "0.00x"
    assert "| 1.00x |" in table and table.count("\n") == 6


def test_side_by_side_waits_for_idle_cores_before_a_turn_and_gives_up_after_its_limit() -> None:
    """A peer's threads spin on after its requests; the next turn starts once a window shows idle cores."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    readings = iter([100.0, 100.25, 100.5, 100.52])  # busy CPU seconds: one core busy for two windows, then idle
    waited = side_by_side.settle(lambda: next(readings), lambda: now[0], sleep)
    assert waited == 3 * side_by_side.SETTLE_WINDOW_S
    busy = iter(100.0 + 0.25 * step for step in range(100))  # never idle: the wait stops at its limit
    now[0] = 0.0
    assert side_by_side.settle(lambda: next(busy), lambda: now[0], sleep) == side_by_side.SETTLE_MAX_S
    assert side_by_side.settle(lambda: None, lambda: now[0], sleep) == 0.0  # no /proc/stat: no wait


def test_concurrent_suite_runs_clients_together_against_a_server(tiny_server, tmp_path):
    out = tmp_path / "concurrent.json"
    config = concurrent.ConcurrentConfig(targets=(("kvcellar", tiny_server),), clients=(1, 3), system_tokens=64,
                                         question_tokens=20, decode_tokens=6, turns=2, probe_under=2, probe_tokens=40,
                                         max_token_id=400, seed=5, out=str(out))  # fmt: skip
    result = concurrent.run(config)
    assert json.loads(out.read_text())["runs"] == result["runs"]
    one, three = result["runs"]["kvcellar"]
    assert (one["clients"], three["clients"]) == (1, 3)
    # One prefill of the shared system prompt: the second and third clients' first turns found its blocks.
    assert sorted(three["first_turn_cached_tokens"]) == [0, 64, 64]
    assert 0 < one["hit_rate"] < three["hit_rate"] < 1  # second turns resend the conversation: cached too
    assert three["ttft_p99_s"] >= three["ttft_p50_s"] > 0 and three["decode_tok_s"] > 0
    assert three["all_decoding_tok_s"] is None  # two turns per client: no single window where all decode
    probe = result["probes"]["kvcellar"]
    assert probe["streams"] == 2 and probe["ratio"] == probe["under_s"] / probe["alone_s"]
    assert "| kvcellar | 3 |" in result["table"]


def test_all_decoding_rate_counts_tokens_while_every_stream_decodes():
    # Stream a decodes from 1.0 to 3.0 s, stream b from 2.0 to 4.0 s: both between 2.0 and 3.0 s.
    a = {"began": 0.0, "ttft_s": 1.0, "last_s": 3.0, "stamps": [1.0, 1.5, 2.0, 2.5, 3.0]}
    b = {"began": 1.0, "ttft_s": 1.0, "last_s": 3.0, "stamps": [1.0, 1.5, 2.0, 2.5, 3.0]}
    assert concurrent._all_decoding_rate([a, b]) == 4 / 1.0  # a's 2.5 and 3.0, b's 2.5 and 3.0 (absolute)
    assert concurrent._all_decoding_rate([a, {**b, "began": 5.0}]) is None  # never both at once


def test_concurrent_suite_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="--clients"):
        concurrent.ConcurrentConfig(targets=(("a", "http://127.0.0.1:1"),), clients=(0,))
    with pytest.raises(ValueError, match="--decode-tokens"):
        concurrent.ConcurrentConfig(targets=(("a", "http://127.0.0.1:1"),), decode_tokens=1)
