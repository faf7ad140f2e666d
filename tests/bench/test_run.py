"""A tiny-model version of every scenario and mode, end to end: files written, figures consistent."""

from __future__ import annotations

import json

import pytest

from kvcellar.config import ROW_INVARIANT_MIN_ROWS

from kvcellar.bench import run_bench
from kvcellar.bench.scenarios import build_requests
from kvcellar.cli import main
from kvcellar.config import CacheConfig, EngineConfig
from .support import BLOCK, LENGTHS, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


def _lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_exact_hits(requests, min_rows: int = 1) -> list[int]:
    """Exact mode: a whole earlier prompt again is served whole; otherwise the shared full blocks that
    leave at least `min_rows` tokens to compute (the row-invariant schedule's rule; 1: any)."""
    out = []
    for i, request in enumerate(requests):
        shared = max((_lcp(request.ids, e.ids) for e in requests[:i] if e.salt_key == request.salt_key), default=0)
        n = len(request.ids)
        out.append(n if shared == n else max(min(shared, n - min_rows), 0) // BLOCK * BLOCK)
    return out


def expected_handwritten_hits(requests) -> list[int]:
    """Longest common prefix with any kept cache, leaving one token to run."""
    return [min(max((_lcp(r.ids, e.ids) for e in requests[:i]), default=0), len(r.ids) - 1)
            for i, r in enumerate(requests)]  # fmt: skip


@pytest.fixture(scope="module")
def results(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    return run_bench(tiny_config(tiny_model_dirs["qwen3"], out)), out


def test_every_scenario_and_mode_writes_its_files(results):
    res, out = results
    phases = {p["mode"]: p for p in res["phases"]}
    assert list(phases) == ["no-cache", "kvcellar", "after-restart", "hf-deepcopy", "device-only", "disk-only",
                            "host-only"]  # fmt: skip
    assert "only beside a GPU" in phases["host-only"]["skipped"]
    has_disk = "disk" in phases["kvcellar"]["info"]["tiers"]
    for mode in ("after-restart", "disk-only"):
        assert bool(phases[mode]["skipped"]) != has_disk, phases[mode]["skipped"]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    md = (out / "results.md").read_text()
    labels = {r["label"] for r in res["rows"]}
    assert {"cold@64", "exact@128", "nearest@64", "chat", "doc-qa", "agent"} <= labels
    assert all(f"| {label} |" in md for label in labels) and res["hardware"]["cpu"] in md
    for name in ("ttft.png", "hit_rate.png", "fetch_split.png"):
        assert (out / name).read_bytes().startswith(PNG)
    assert res["checks"] == []
    assert not (out / "cache" / "kvcellar").exists()  # the disk tiers' files are removed unless --keep-cache


def _phase(res, mode):
    return next(p for p in res["phases"] if p["mode"] == mode)


@pytest.mark.parametrize("kind", ["prefix", "chat", "doc-qa", "agent"])
def test_cached_tokens_match_what_each_mode_can_reuse(results, kind):
    res, _ = results
    config = tiny_config(".", ".")
    requests = build_requests(kind, config, 2000)
    kinds = {"cold", "exact", "nearest"} if kind == "prefix" else {kind}
    cached = {mode: [s["num_cached_tokens"] for s in _phase(res, mode)["samples"] if s["kind"] in kinds]
              for mode in ("no-cache", "kvcellar", "hf-deepcopy")}  # fmt: skip
    assert cached["no-cache"] == [0] * len(requests)
    schedule = _phase(res, "kvcellar")["info"]["prefill_schedule"]
    assert schedule == "row-invariant"  # a full-attention model on a CPU in exact mode (engine/schedule.py)
    assert cached["kvcellar"] == expected_exact_hits(requests, ROW_INVARIANT_MIN_ROWS)
    assert cached["hf-deepcopy"] == expected_handwritten_hits(requests)
    prompts = [s["num_prompt_tokens"] for s in _phase(res, "kvcellar")["samples"] if s["kind"] in kinds]
    assert prompts == [len(r.ids) for r in requests]


def test_prefix_rows_per_mode(results):
    res, _ = results
    rows = {(r["label"], r["mode"]): r for r in res["rows"]}
    for length in LENGTHS:
        tag = f"@{length}"
        for mode in ("kvcellar", "device-only"):
            assert rows[("exact" + tag, mode)]["hit_rate"] == 1.0  # exact repeat: every prompt token cached
            assert rows[("exact" + tag, mode)]["hit_rate_by_tier"] == {"device": 1.0}
            assert rows[("nearest" + tag, mode)]["num_saved_tokens"] == 2 * (length - BLOCK)
            assert rows[("cold" + tag, mode)]["num_saved_tokens"] == 0
        assert rows[("cold" + tag, "no-cache")]["speedup"] == 1.0
        assert rows[("exact" + tag, "no-cache")]["hit_rate"] == 0.0
        if ("restart" + tag, "after-restart") in rows:  # a new engine on the same folder: everything from disk
            assert rows[("restart" + tag, "after-restart")]["hit_rate_by_tier"] == {"disk": 1.0}
        if ("exact" + tag, "disk-only") in rows:
            assert set(rows[("exact" + tag, "disk-only")]["hit_rate_by_tier"]) <= {"disk"}
        for row in (r for r in res["rows"] if r["label"].endswith(tag)):
            assert 0 < row["ttft_p50_s"] <= row["ttft_p90_s"] <= row["ttft_p99_s"]
            assert row["lookup_p50_s"] <= row["ttft_p50_s"]


def test_restart_in_a_fresh_process(tiny_model_dirs, tmp_path):
    """The real thing: each phase in its own process; the restart opens the first one's cache folder."""
    # cost_model=False: the test checks that the restart restores from disk; timing must not decide whether it does.
    engine = EngineConfig(str(tiny_model_dirs["qwen3"]), device="cpu", block_size=BLOCK, cache=CacheConfig(cost_model=False))
    config = tiny_config(tiny_model_dirs["qwen3"], tmp_path, lengths=(64,), modes=("kvcellar", "after-restart"),
                         scenarios=("prefix",), isolate=True, keep_cache=True, engine=engine)  # fmt: skip
    res = run_bench(config)
    restart = _phase(res, "after-restart")
    if "disk" not in _phase(res, "kvcellar")["info"]["tiers"]:
        pytest.skip("this engine has no disk tier yet")
    assert restart["skipped"] is None
    assert [s["cached_tokens_by_tier"] for s in restart["samples"]] == [{"disk": 64}] * 2
    assert (tmp_path / "cache" / "kvcellar").is_dir()  # --keep-cache


def test_cli(tiny_model_dirs, tmp_path, capsys):
    args = ["bench", "--model", str(tiny_model_dirs["qwen3"]), "--block-size", "16", "--device", "cpu", "--lengths", "64",
            "--repeats", "1", "--modes", "no-cache,kvcellar", "--scenarios", "prefix", "--same-process",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    assert "| exact@64 |" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"results.json", "results.md", "ttft.png", "hit_rate.png"}
    assert main(args + ["--no-cache"]) == 2
    assert main([*args[:-2], "--modes", "warp-drive", "--out", str(tmp_path / "x")]) == 2
    assert "unknown mode" in capsys.readouterr().err


def test_http_target(tiny_server, tmp_path):
    config = tiny_config(".", tmp_path, engine=None, url=tiny_server, server_block_size=BLOCK, max_token_id=2000,
                         scenarios=("prefix", "chat"))  # fmt: skip
    res = run_bench(config)
    ran = [p["mode"] for p in res["phases"] if not p["skipped"]]
    assert ran == ["http-no-reuse", "http"] and res["checks"] == []
    assert "in-process only" in next(p for p in res["phases"] if p["mode"] == "after-restart")["skipped"]
    rows = {(r["label"], r["mode"]): r for r in res["rows"]}
    for length in LENGTHS:
        assert rows[(f"exact@{length}", "http")]["hit_rate"] == 1.0
        assert rows[(f"exact@{length}", "http-no-reuse")]["hit_rate"] == 0.0
        assert rows[(f"cold@{length}", "http-no-reuse")]["speedup"] == 1.0
    assert rows[("chat", "http")]["num_saved_tokens"] > 0
    assert res["server"]["model"]["id"] == "qwen3"
    assert (tmp_path / "results.md").exists() and (tmp_path / "ttft.png").exists()
