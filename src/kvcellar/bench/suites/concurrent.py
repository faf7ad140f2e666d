"""Concurrent suite: many clients at once against one or more servers (kvcellar, vLLM, llama.cpp) over HTTP.

Operations: `ConcurrentConfig`, `run(config) -> dict` (prints the table, writes the JSON).

For each client count N in `clients` and each target (alternating which goes
first), N clients start together (a barrier), each a thread with its own
connection, streaming POST /v1/completions with token-id prompts, temperature 0
and `ignore_eos`. Client i sends a shared system prompt S (`system_tokens`,
new for every (N, target) run, so the run starts cold) plus its own question
(`question_tokens`), and for `turns` > 1 sends the conversation so far plus a
new question again after each answer (multi-turn chat). Every answer has
`decode_tokens` tokens. Reported per run:

- TTFT p50 / p99 over every turn of every client (the client's clock);
- inter-token latency p50 / p99: gaps between a stream's token chunks;
- decode tok/s: the sum of each stream's tokens after its first over its decode
  time (what the streams decode together; a stream that starts early counts the
  later arrivals' prefills in its time); all decoding tok/s: every stream's
  tokens while all of them decode (from the last first token to the first last
  token), the batched decode rate alone; aggregate tok/s: every token over the
  run's wall time (prefills included);
- hit rate: cached prompt tokens (the server's `usage.prompt_tokens_details.cached_tokens`)
  over prompt tokens, and each first turn's cached tokens, in the order their
  first tokens came: with one prefill of S, every request but one reports S's
  full blocks.

Then, with `probe_under` > 0, the interference probe: a fresh `probe_tokens`
prompt (1 token) alone, then the same length again (new ids) while
`probe_under` streams decode; its TTFT ratio says how much running streams
delay a new request. The machine's cores are let settle before each run
(side_by_side.settle) and the load average is recorded.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from kvcellar.bench.config import DEFAULT_MAX_TOKEN_ID
from kvcellar.bench.progress import log
from kvcellar.bench.scenarios import make_ids
from kvcellar.bench.suites.side_by_side import Server, connect, settle, stream_until, write_result

PROBE_BACKGROUND_TOKENS = 1024  # the background streams' answers: long enough to outlast the probe


@dataclass(frozen=True, slots=True)
class ConcurrentConfig:
    """`targets`: (name, base URL) pairs, one or more. `seed` None: the clock (recorded)."""

    targets: tuple[tuple[str, str], ...]
    clients: tuple[int, ...] = (1, 2, 4, 8)
    system_tokens: int = 1024
    question_tokens: int = 64
    decode_tokens: int = 64
    turns: int = 1
    probe_under: int = 4
    probe_tokens: int = 512
    max_token_id: int = DEFAULT_MAX_TOKEN_ID
    seed: int | None = None
    out: str = "bench-out/concurrent.json"
    command: str = ""

    def __post_init__(self) -> None:
        if not self.targets or any(not urlsplit(url).netloc for _, url in self.targets):
            raise ValueError("give at least one --target NAME=http://HOST:PORT")
        if len({name for name, _ in self.targets}) != len(self.targets):
            raise ValueError(f"--target names must differ (got {[name for name, _ in self.targets]})")
        if not self.clients or min(self.clients) < 1:
            raise ValueError(f"--clients must be counts >= 1 (got {self.clients})")
        for name, value in (("--question-tokens", self.question_tokens), ("--turns", self.turns),
                            ("--probe-tokens", self.probe_tokens)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if self.system_tokens < 0 or self.probe_under < 0:
            raise ValueError("--system-tokens and --probe-under must be >= 0")
        if self.decode_tokens < 2:
            raise ValueError(f"--decode-tokens must be >= 2: decode rates run from the first token (got {self.decode_tokens})")


def _client(server: Server, system: list[int], seed: str, config: ConcurrentConfig, start: threading.Barrier) -> list[dict]:
    """One client's turns: the conversation so far plus a new question each time."""
    prompt = list(system)
    turns = []
    start.wait()
    for turn in range(config.turns):
        prompt = prompt + make_ids(config.question_tokens, f"{seed}:q{turn}", config.max_token_id)
        began = time.perf_counter()
        figures = server.complete(prompt, config.decode_tokens)
        turns.append({**figures, "began": began, "prompt_tokens": len(prompt)})
        prompt = prompt + make_ids(figures["tokens"], f"{seed}:a{turn}", config.max_token_id)  # stands for the answer
    return turns


def run_clients(server: Server, count: int, seed: str, config: ConcurrentConfig) -> dict:
    """`count` clients at once; the run's figures (see the module doc)."""
    system = make_ids(config.system_tokens, f"{seed}:system", config.max_token_id)
    start = threading.Barrier(count)
    results: list[list[dict] | BaseException] = [[] for _ in range(count)]

    def work(index: int) -> None:
        try:
            results[index] = _client(server, system, f"{seed}:client-{index}", config, start)
        except BaseException as exc:  # reported after the join
            results[index] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{server.name}: {len(errors)} of {count} clients failed: {errors[0]}")
    turns = [turn for client in results for turn in client]
    wall = max(turn["began"] + turn["last_s"] for turn in turns) - began
    ttfts = [turn["ttft_s"] for turn in turns]
    gaps = [b - a for turn in turns for a, b in zip(turn["stamps"], turn["stamps"][1:])]
    decode = sum((turn["tokens"] - 1) / max(turn["last_s"] - turn["ttft_s"], 1e-9) for turn in turns) / config.turns
    first_turns = sorted((client[0] for client in results), key=lambda turn: turn["began"] + turn["ttft_s"])
    prompt_tokens = sum(turn["prompt_tokens"] for turn in turns)
    cached = sum(turn["cached_tokens"] or 0 for turn in turns)
    return {"clients": count, "ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p99_s": _quantile(ttfts, 0.99),
            "itl_p50_s": _quantile(gaps, 0.5), "itl_p99_s": _quantile(gaps, 0.99), "decode_tok_s": decode,
            "all_decoding_tok_s": _all_decoding_rate(turns) if config.turns == 1 else None,
            "aggregate_tok_s": sum(turn["tokens"] for turn in turns) / wall, "hit_rate": cached / prompt_tokens,
            "first_turn_cached_tokens": [turn["cached_tokens"] for turn in first_turns], "wall_s": wall}  # fmt: skip


def _all_decoding_rate(turns: list[dict]) -> float | None:
    """Tokens per second of every stream together while all of them decode: from the last stream's first token
    to the first stream's last (None where the streams never all decode at once)."""
    start = max(turn["began"] + turn["ttft_s"] for turn in turns)
    end = min(turn["began"] + turn["last_s"] for turn in turns)
    if end <= start:
        return None
    inside = sum(1 for turn in turns for stamp in turn["stamps"] if start < turn["began"] + stamp <= end)
    return inside / (end - start)


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def run_probe(server: Server, seed: str, config: ConcurrentConfig) -> dict:
    """The probe prompt's TTFT alone, then while `probe_under` streams decode."""
    alone = server.complete(make_ids(config.probe_tokens, f"{seed}:probe-alone", config.max_token_id), 1)["ttft_s"]
    decoding = threading.Barrier(config.probe_under + 1)
    stop = threading.Event()

    def background(index: int) -> None:
        ids = make_ids(64, f"{seed}:background-{index}", config.max_token_id)
        stream_until(server, ids, PROBE_BACKGROUND_TOKENS, decoding, stop)

    threads = [threading.Thread(target=background, args=(i,)) for i in range(config.probe_under)]
    for thread in threads:
        thread.start()
    try:
        decoding.wait()  # every background stream has its first tokens
    except threading.BrokenBarrierError:
        stop.set()
        raise RuntimeError(f"{server.name}: a background stream of the probe failed (its error is printed above)") from None
    try:
        under = server.complete(make_ids(config.probe_tokens, f"{seed}:probe-under", config.max_token_id), 1)["ttft_s"]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return {"alone_s": alone, "under_s": under, "ratio": under / alone, "streams": config.probe_under}


def table_text(names: list[str], runs: dict[str, list[dict]], probes: dict[str, dict]) -> str:
    lines = ["| target | clients | TTFT p50 | TTFT p99 | ITL p50 | decode tok/s | x one client | all decoding tok/s | "
             "aggregate tok/s | hit rate |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in names:
        one = next((r["decode_tok_s"] for r in runs[name] if r["clients"] == 1), None)
        for r in runs[name]:
            times = one and f"{r['decode_tok_s'] / one:.2f}x"
            together = r.get("all_decoding_tok_s")
            lines.append(f"| {name} | {r['clients']} | {r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | "
                         f"{r['itl_p50_s'] * 1000:.0f} ms | {r['decode_tok_s']:.1f} | {times or '-'} | "
                         f"{'-' if together is None else f'{together:.1f}'} | {r['aggregate_tok_s']:.1f} | "
                         f"{r['hit_rate']:.0%} |")  # fmt: skip
    for name, probe in probes.items():
        lines.append(f"\n{name}: a {probe.get('tokens', '')}-token prompt's TTFT {probe['alone_s']:.3f} s alone, "
                     f"{probe['under_s']:.3f} s while {probe['streams']} streams decode ({probe['ratio']:.2f}x)")
    return "\n".join(lines)


def run(config: ConcurrentConfig) -> dict:
    from kvcellar.bench.hardware import hardware

    servers, seed, models = connect(config.targets, config.seed, config.max_token_id)
    runs: dict[str, list[dict]] = {s.name: [] for s in servers}
    loads = []
    for step, count in enumerate(config.clients):
        order = servers if step % 2 == 0 else servers[::-1]
        for server in order:
            settled = settle()
            before = os.getloadavg()
            figures = run_clients(server, count, f"{seed}:{server.name}:{count}", config)
            runs[server.name].append({**figures, "settle_s": settled})
            loads.append({"target": server.name, "clients": count, "before": before, "after": os.getloadavg()})
            log(f"  {server.name}, {count} clients: TTFT p50 {figures['ttft_p50_s']:.3f} s, decode "
                f"{figures['decode_tok_s']:.1f} tok/s, hit rate {figures['hit_rate']:.0%}, first turns' cached tokens "
                f"{figures['first_turn_cached_tokens']}")
    probes = {}
    if config.probe_under:
        for server in servers:
            settle()
            probes[server.name] = {**run_probe(server, f"{seed}:{server.name}:probe", config), "tokens": config.probe_tokens}
            log(f"  {server.name}: probe {probes[server.name]}")
    text = table_text([s.name for s in servers], runs, probes)
    print(text)
    result = {"hardware": hardware("cpu"), "command": config.command, "models": models, "seed": seed,
              "config": {k: getattr(config, k) for k in ("clients", "system_tokens", "question_tokens", "decode_tokens",
                                                         "turns", "probe_under", "probe_tokens")},
              "load_average": loads, "table": text, "runs": runs, "probes": probes}  # fmt: skip
    write_result(result, config.out)
    return result
