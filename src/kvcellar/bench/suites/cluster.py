"""Cluster suite: servers sharing one Redis behind a cache-aware router, against servers that share nothing.

Operations: `ClusterBenchConfig`, `run(config) -> dict` (prints the tables, writes the JSON).

Three setups of `replicas` servers each (`--threads` per server, no disk
tier, `device_cache_size` and `kv_budget` each), each behind its own
vllm-router, one setup at a time (started cold, stopped after its workload,
so that only one setup's servers hold memory):
- shared-cache-aware: every server on one redis-server (`--remote-cache`),
  router policy `cache_aware`;
- shared-round-robin: the same, policy `round_robin`;
- isolated-round-robin: no shared tier, policy `round_robin`.
Each round runs the workload on every setup, reversing the order each round,
each with new token ids (every round starts cold): `conversations`
conversations, `clients` at a time, each of `turns` turns; a turn sends a
system prompt shared by all conversations of the round, then the
conversation so far (earlier questions and answers) and a new question, and
streams `decode_tokens` tokens. Reported per setup: TTFT p50 / p99 over every
turn (the client's clock, through the router), hit rate (cached prompt tokens
over prompt tokens, as the servers report them), cached tokens by tier, and
how many requests each server got (the router's spread).

Redis is emptied before each setup runs. Then the shared tier's restore
bandwidth: the entries the last shared setup's servers wrote, loaded through `RemoteTier.prepare_load` (one pipelined
round trip, every entry's checksum and checks, tensors viewed in place)
against a raw pipelined GET of the same keys, `bandwidth_rounds` pairs, which
goes first alternating; the ratio is the median of the pairs' ratios.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kvcellar.bench.config import DEFAULT_MAX_TOKEN_ID
from kvcellar.bench.progress import log
from kvcellar.bench.scenarios import make_ids
from kvcellar.bench.suites.side_by_side import Server, settle, write_result

# (name, shared tier?, router policy)
SETUPS = (("shared-cache-aware", True, "cache_aware"), ("shared-round-robin", True, "round_robin"),
          ("isolated-round-robin", False, "round_robin"))
MAX_BANDWIDTH_ENTRIES = 32


@dataclass(frozen=True, slots=True)
class ClusterBenchConfig:
    model: str | None = None
    replicas: int = 2
    conversations: int = 8
    # Conversations at a time. Not a multiple of `replicas`: with as many clients as servers, round robin
    # would keep each conversation on one server by accident (the clients take turns in step).
    clients: int = 3
    turns: int = 4
    system_tokens: int = 1024
    question_tokens: int = 256  # a turn's new text (a question with a pasted file or tool output)
    decode_tokens: int = 16
    rounds: int = 2
    threads: int = 1
    block_size: int | None = None
    device_cache_size: str = "2G"  # per server: several servers share this machine's memory
    kv_budget: str = "1G"
    redis_maxmemory: str = "4gb"
    bandwidth_rounds: int = 9
    max_token_id: int = DEFAULT_MAX_TOKEN_ID
    seed: int | None = None
    out: str = "bench-out/cluster.json"
    command: str = ""

    def __post_init__(self) -> None:
        for name, value in (("--replicas", self.replicas), ("--conversations", self.conversations),
                            ("--clients", self.clients), ("--turns", self.turns), ("--rounds", self.rounds),
                            ("--threads", self.threads), ("--bandwidth-rounds", self.bandwidth_rounds),
                            ("--question-tokens", self.question_tokens)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if self.decode_tokens < 1 or self.system_tokens < 0:
            raise ValueError("--decode-tokens must be >= 1 and --system-tokens >= 0")


def _conversation(router: Server, system: list[int], seed: str, config: ClusterBenchConfig) -> list[dict]:
    prompt, turns = list(system), []
    for turn in range(config.turns):
        prompt = prompt + make_ids(config.question_tokens, f"{seed}:q{turn}", config.max_token_id)
        figures = router.complete(prompt, config.decode_tokens)
        turns.append({**figures, "prompt_tokens": len(prompt), "turn": turn})
        prompt = prompt + make_ids(figures["tokens"], f"{seed}:a{turn}", config.max_token_id)  # stands for the answer
    return turns


def _requests_served(url: str) -> float:
    """The finished requests a server counted (its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kvcellar_requests_total{"))


def run_workload(router: Server, servers: list[str], seed: str, config: ClusterBenchConfig) -> dict:
    """Every conversation, `clients` at a time; the setup's figures."""
    served_before = [_requests_served(url) for url in servers]
    system = make_ids(config.system_tokens, f"{seed}:system", config.max_token_id)
    pending = list(range(config.conversations))
    lock = threading.Lock()
    turns: list[dict] = []
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                index = pending.pop(0)
            try:
                done = _conversation(router, system, f"{seed}:conversation-{index}", config)
            except BaseException as exc:  # reported after the join
                with lock:
                    errors.append(exc)
                return
            with lock:
                turns.extend(done)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(config.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{router.name}: a conversation failed: {errors[0]}")
    ttfts = [turn["ttft_s"] for turn in turns]
    later = [turn["ttft_s"] for turn in turns if turn["turn"] > 0]
    by_tier: dict[str, int] = {}
    for turn in turns:
        for tier, count in turn["cached_by_tier"].items():
            by_tier[tier] = by_tier.get(tier, 0) + count
    return {"ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p99_s": _quantile(ttfts, 0.99),
            "later_turns_ttft_p50_s": _quantile(later, 0.5) if later else None,
            "hit_rate": sum(t["cached_tokens"] or 0 for t in turns) / sum(t["prompt_tokens"] for t in turns),
            "cached_tokens_by_tier": by_tier, "requests": len(turns), "wall_s": time.perf_counter() - began,
            "requests_per_server": [int(_requests_served(url) - before) for url, before in zip(servers, served_before)]}  # fmt: skip


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def restore_bandwidth(url: str, rounds: int) -> dict:
    """The shared tier's `prepare_load` against a raw pipelined GET of the same entries, alternating."""
    import redis

    from kvcellar.kv.torch_codec import TorchCodec
    from kvcellar.tiers.format import parse_header
    from kvcellar.tiers.remote.records import decode_meta, entry_key
    from kvcellar.tiers.remote.tier import RemoteTier

    client = redis.Redis.from_url(url)
    prefix = "kvcellar:"
    records = {}
    for name in client.scan_iter(match=f"{prefix}c:*", count=1000):
        for field, record in client.hgetall(name).items():
            records[bytes.fromhex(field.decode())] = record
    keys = sorted(key for key in records if client.exists(entry_key(prefix, key)))[:MAX_BANDWIDTH_ENTRIES]
    if not keys:
        raise RuntimeError("the shared setup left no entry in Redis to load")
    header, _ = parse_header(client.getrange(entry_key(prefix, keys[0]), 0, 1 << 20))
    tier = RemoteTier(url, TorchCodec(header.layout, "cpu"), prefix=prefix, timeout_s=30.0)
    try:
        parents = {decode_meta(key, records[key]).parent for key in keys}
        for parent in parents:
            tier.children(parent)  # the tier learns the entries' records, as a lookup would
        num_bytes = sum(client.strlen(entry_key(prefix, key)) for key in keys)
        def load() -> None:
            tier.prepare_load(keys)

        def raw() -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(entry_key(prefix, key))
            pipe.execute()

        tier_s, raw_s = [], []
        for index in range(rounds):  # which goes first alternates
            for work, times in ((load, tier_s), (raw, raw_s))[:: 1 if index % 2 == 0 else -1]:
                started = time.perf_counter()
                work()
                times.append(time.perf_counter() - started)
    finally:
        tier.close()
    ratios = [raw / loaded for loaded, raw in zip(tier_s, raw_s)]  # each round's pair, next to each other in time
    return {"entries": len(keys), "bytes": num_bytes, "tier_s": tier_s, "raw_s": raw_s,
            "tier_gb_s": num_bytes / statistics.median(tier_s) / 1e9, "raw_gb_s": num_bytes / statistics.median(raw_s) / 1e9,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip


def table_text(rounds: list[dict]) -> str:
    lines = ["| setup | shared tier | router policy | TTFT p50 | TTFT p99 | later turns' TTFT p50 | hit rate | "
             "cached tokens by tier | requests per server |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, shared, policy in SETUPS:
        runs = [r[name] for r in rounds]

        def cell(key: str) -> str:
            values = [run[key] for run in runs if run[key] is not None]
            return f"{statistics.median(values):.3f} s ({min(values):.3f}–{max(values):.3f})" if values else "-"

        tiers: dict[str, int] = {}
        for run in runs:
            for tier, count in run["cached_tokens_by_tier"].items():
                tiers[tier] = tiers.get(tier, 0) + count
        hits = statistics.median(run["hit_rate"] for run in runs)
        spread = " / ".join(",".join(map(str, run["requests_per_server"])) for run in runs)
        lines.append(f"| {name} | {'yes' if shared else 'no'} | {policy} | {cell('ttft_p50_s')} | {cell('ttft_p99_s')} "
                     f"| {cell('later_turns_ttft_p50_s')} | {hits:.0%} "
                     f"| {', '.join(f'{t} {c}' for t, c in sorted(tiers.items())) or '-'} | {spread} |")  # fmt: skip
    return "\n".join(lines)


def _run_setup(setup: tuple[str, bool, str], redis_url: str, model: str, seed: str, config: ClusterBenchConfig,
               folder: Path) -> dict:
    """Start one setup's servers and router, warm them up, run the workload, stop them (every setup starts cold)."""
    from kvcellar.cluster.processes import Processes, free_port

    name, shared, policy = setup
    args = ["--no-disk-tier", "--threads", str(config.threads), "--device-cache-size", config.device_cache_size,
            "--kv-budget", config.kv_budget, *(["--remote-cache", redis_url] if shared else [])]  # fmt: skip
    if config.block_size is not None:
        args += ["--block-size", str(config.block_size)]
    processes = Processes(folder / name)
    try:
        urls = [processes.server(f"server-{i}", free_port(), model, args) for i in range(config.replicas)]
        router = Server(name, processes.router(free_port(), urls, policy))
        for index, url in enumerate(urls):  # first-request costs stay out of the figures
            Server(f"{name}-{index}", url).complete(make_ids(64, f"{seed}:warm-up-{index}", config.max_token_id), 4)
        settle()
        return run_workload(router, urls, seed, config)
    finally:
        processes.stop()


def run(config: ClusterBenchConfig) -> dict:
    import redis

    from kvcellar.bench.hardware import hardware
    from kvcellar.bench.runner import bench_model_dir
    from kvcellar.cluster.processes import Processes, free_port

    model = config.model or str(bench_model_dir())
    seed = config.seed if config.seed is not None else int(time.time())
    folder = Path(tempfile.mkdtemp(prefix="kvcellar-bench-cluster-"))
    store = Processes(folder)
    try:
        redis_url = store.redis(free_port(), config.redis_maxmemory)
        rounds, loads = [], []
        for index in range(config.rounds):
            order = list(SETUPS) if index % 2 == 0 else list(SETUPS)[::-1]
            figures = {}
            for setup in order:
                redis.Redis.from_url(redis_url).flushall()  # each shared setup starts from an empty store
                before = os.getloadavg()
                log(f"round {index + 1}/{config.rounds}: {setup[0]} ({config.replicas} servers, {setup[2]})")
                figures[setup[0]] = _run_setup(setup, redis_url, model, f"{seed}:round-{index}:{setup[0]}", config,
                                               folder / f"round-{index}")  # fmt: skip
                loads.append({"setup": setup[0], "round": index, "before": before, "after": os.getloadavg()})
            rounds.append(figures)
        last_shared = next(setup for setup in reversed(order) if setup[1])
        if last_shared != order[-1]:  # the store holds the last setup's entries only when it was a shared one
            log(f"refilling the store: {last_shared[0]} once more")
            redis.Redis.from_url(redis_url).flushall()
            _run_setup(last_shared, redis_url, model, f"{seed}:bandwidth", config, folder / "bandwidth")
        settle()
        bandwidth = restore_bandwidth(redis_url, config.bandwidth_rounds)
    finally:
        store.stop()
    table = table_text(rounds)
    print(table)
    print(f"\nshared tier restore: {bandwidth['tier_gb_s']:.2f} GB/s through RemoteTier.prepare_load, "
          f"{bandwidth['raw_gb_s']:.2f} GB/s raw pipelined GET ({bandwidth['ratio']:.0%}, pairs "
          f"{bandwidth['ratio_min']:.0%}–{bandwidth['ratio_max']:.0%}) over "
          f"{bandwidth['entries']} entries, {bandwidth['bytes'] / 1e6:.0f} MB")  # fmt: skip
    result = {"suite": "cluster", "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
              "model": model, "seed": seed, "hardware": hardware("cpu"), "rounds": rounds, "loads": loads,
              "bandwidth": bandwidth, "table": table}  # fmt: skip
    write_result(result, config.out)
    return result
