"""Side-by-side suite: kvcellar and peer servers (llama.cpp's llama-server, vLLM) on the same model and prompts.

Operations: `SideBySideConfig`, `run(config) -> dict` (prints the table,
writes the JSON), `Server` (`.model()`, `.complete(ids, max_tokens)`),
`table_text(names, rounds, length)`.

Every request is a streaming POST /v1/completions with a token-id prompt,
temperature 0 and `ignore_eos`; times are the client's. Per round, each
target (in alternating order, so drift hits both alike) gets a fresh seeded
prompt P of `length` ids, the same ids for every target:

| row | request | figure |
|---|---|---|
| cold | P, 1 token | time to first token |
| exact repeat | P again, 16 tokens | time to first token |
| extension | P + 64 new ids, 1 token | time to first token |
| shared 3/4 | P's first 3/4, then as many new ids, 1 token | time to first token |
| decode | P + 64 again, `decode_tokens` tokens | tokens/s from the first to the last token |

Before each target's turn the suite waits (up to `SETTLE_MAX_S`) until the
machine's cores are idle for a second: a peer's threads keep spinning on a
core for about a second after its last request (vLLM CPU's OpenMP), and
kvcellar, which sizes its threads to the cores other processes leave free,
would start the next turn on one thread. The waits are recorded.

A warm-up request (other ids) goes to each target first. The seed defaults
to the clock, so a second run against the same servers is cold again; it is
recorded. The load average is sampled around every round: compare runs only
at similar load. The peers are started by the scripts in `scripts/peers/`.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kvcellar.bench.config import DEFAULT_MAX_TOKEN_ID
from kvcellar.bench.progress import log
from kvcellar.bench.scenarios import make_ids
from kvcellar.engine.threads import cpu_busy_seconds

EXTENSION_TOKENS, REPEAT_TOKENS, WARM_UP_TOKENS = 64, 16, 256
# Idle: fewer busy cores than this over one window of SETTLE_WINDOW_S; waited for at most SETTLE_MAX_S. The
# window is the span over which kvcellar's thread sizer looks for contention (engine/threads.py SUSTAINED_S):
# a shorter quiet window let a turn start while the sizer still counted the peer's last second.
SETTLE_BUSY_CORES, SETTLE_WINDOW_S, SETTLE_MAX_S = 0.25, 1.0, 8.0
ROWS = ("cold", "exact repeat", "extension", "shared 3/4", "decode")


@dataclass(frozen=True, slots=True)
class SideBySideConfig:
    """`targets`: (name, base URL) pairs, at least two; the first is the one compared. `seed` None: the clock."""

    targets: tuple[tuple[str, str], ...]
    length: int = 2048
    rounds: int = 3
    decode_tokens: int = 128
    max_token_id: int = DEFAULT_MAX_TOKEN_ID
    seed: int | None = None
    out: str = "bench-out/side_by_side.json"
    command: str = ""

    def __post_init__(self) -> None:
        if len(self.targets) < 2 or any(not urlsplit(url).netloc for _, url in self.targets):
            raise ValueError("give at least two --target NAME=http://HOST:PORT")
        if len({name for name, _ in self.targets}) != len(self.targets):
            raise ValueError(f"--target names must differ (got {[name for name, _ in self.targets]})")
        for name, value in (("--length", self.length), ("--rounds", self.rounds)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if self.decode_tokens < 2:
            raise ValueError(f"--decode-tokens must be >= 2: the rate is timed from the first to the last token "
                             f"(got {self.decode_tokens})")
        if self.max_token_id < 200:
            raise ValueError(f"--max-token-id must be >= 200: prompts use ids from 100 up (got {self.max_token_id})")


def parse_target(text: str) -> tuple[str, str]:
    """"kvcellar=http://127.0.0.1:8000" -> ("kvcellar", "http://127.0.0.1:8000")."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"--target must be NAME=http://HOST:PORT (got {text!r})")
    return name, url


class Server:
    """One OpenAI-compatible server; each request opens its own connection."""

    def __init__(self, name: str, url: str) -> None:
        parts = urlsplit(url)
        self.name, self.netloc, self.base = name, parts.netloc, parts.path.rstrip("/").removesuffix("/v1")

    def model(self) -> str:
        conn = http.client.HTTPConnection(self.netloc, timeout=60)
        try:
            conn.request("GET", self.base + "/v1/models")
            data = json.loads(conn.getresponse().read())
            return data["data"][0]["id"]
        finally:
            conn.close()

    def complete(self, ids: list[int], max_tokens: int) -> dict:
        """Stream one completion: first- and last-token times (s from the request), every token chunk's time,
        tokens, the server's cache figure."""
        body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        conn = http.client.HTTPConnection(self.netloc, timeout=3600)
        stamps, usage = [], {}
        try:
            started = time.perf_counter()
            conn.request("POST", self.base + "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"{self.name}: POST /v1/completions answered {response.status}: {response.read()[:300]!r}")
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                # Every chunk with a choice: a token's, with or without text (a random-weight model's tokens often
                # decode to none), or the closing one (vLLM sends the last token in it; kvcellar right after it).
                if chunk.get("choices"):
                    stamps.append(time.perf_counter() - started)
        finally:
            conn.close()
        if not stamps:
            raise RuntimeError(f"{self.name}: the stream carried no token")
        tokens = usage.get("completion_tokens") or len(stamps)
        details = usage.get("prompt_tokens_details") or {}
        return {"ttft_s": stamps[0], "last_s": stamps[-1], "tokens": tokens, "cached_tokens": details.get("cached_tokens"),
                "cached_by_tier": details.get("cached_tokens_by_tier") or {}, "stamps": stamps}  # fmt: skip


def stream_until(server: Server, ids: list[int], max_tokens: int, started: threading.Barrier, stop: threading.Event) -> None:
    """Stream a long completion: join `started` after its second token, hang up once `stop` is set."""
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection(server.netloc, timeout=3600)
    chunks = 0
    try:
        conn.request("POST", server.base + "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{server.name}: POST /v1/completions answered {response.status}: {response.read()[:300]!r}")
        for raw in response:
            if raw.startswith(b"data:"):
                chunks += 1
                if chunks == 2:
                    started.wait()
                if stop.is_set():
                    break
    finally:
        if chunks < 2:  # never decoding: release the waiter rather than hang it
            started.abort()
        conn.close()


def run_round(
    servers: list[Server], prompt: list[int], extension: list[int], branch: list[int], decode_tokens: int, order: list[int]
) -> dict:
    """`branch`: a prompt sharing P's first 3/4 (the rest new)."""
    out: dict[str, dict] = {}
    for index in order:
        server = servers[index]
        settled = settle()
        raw = {"cold": server.complete(prompt, 1), "exact repeat": server.complete(prompt, REPEAT_TOKENS),
               "extension": server.complete(prompt + extension, 1), "shared 3/4": server.complete(branch, 1),
               "decode": server.complete(prompt + extension, decode_tokens)}  # fmt: skip
        decode = raw["decode"]
        rate = (decode["tokens"] - 1) / max(decode["last_s"] - decode["ttft_s"], 1e-9)
        for figures in raw.values():
            figures.pop("stamps")
        out[server.name] = {**{row: raw[row]["ttft_s"] for row in ROWS if row != "decode"}, "decode": rate, "raw": raw,
                            "settle_s": settled}  # fmt: skip
        log(f"  {server.name}: cold {raw['cold']['ttft_s']:.3f} s, repeat {raw['exact repeat']['ttft_s']:.3f} s, "
            f"+{len(extension)} {raw['extension']['ttft_s']:.3f} s, 3/4 shared {raw['shared 3/4']['ttft_s']:.3f} s, "
            f"decode {rate:.1f} tok/s")
    return out


def settle(busy_seconds=cpu_busy_seconds, clock=time.monotonic, sleep=time.sleep) -> float:
    """Wait until the cores are idle over one window (see the module doc); returns the seconds waited."""
    started = clock()
    before = busy_seconds()
    if before is None:  # no /proc/stat: nothing to wait for
        return 0.0
    while clock() - started < SETTLE_MAX_S:
        sleep(SETTLE_WINDOW_S)
        after = busy_seconds()
        if (after - before) / SETTLE_WINDOW_S < SETTLE_BUSY_CORES:
            break
        before = after
    return clock() - started


def _cell(values: list[float], unit: str) -> str:
    fmt = "{:.1f}" if unit == "tok/s" else "{:.3f}"
    median = fmt.format(statistics.median(values))
    return f"{median} {unit} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _ratio_text(ratio: float) -> str:
    """A ratio as written in the table: "0.62x", or "1780x less" where two decimals would read 0.00x."""
    return f"{ratio:.2f}x" if ratio >= 0.1 or ratio == 0 else f"{1 / ratio:.0f}x less"


def table_text(names: list[str], rounds: list[dict], length: int) -> str:
    """Median (min–max) per row and target, then the first target's ratio to each other one."""
    head = f"| {length}-token prompt | " + " | ".join(names) + " | " + " | ".join(
        f"{names[0]} ÷ {other}" for other in names[1:]) + " |"  # fmt: skip
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for row in ROWS:
        unit = "tok/s" if row == "decode" else "s"
        values = {name: [r[name][row] for r in rounds] for name in names}
        ratios = [statistics.median(values[names[0]]) / statistics.median(values[other]) for other in names[1:]]
        lines.append(f"| {row} | " + " | ".join(_cell(values[n], unit) for n in names) + " | "
                     + " | ".join(_ratio_text(ratio) for ratio in ratios) + " |")  # fmt: skip
    return "\n".join(lines)


def connect(targets: tuple[tuple[str, str], ...], seed: int | None, max_token_id: int) -> tuple[list[Server], int, dict]:
    """The targets' servers, warmed up (first-request costs, allocator and threads, stay out of the figures);
    the seed (None: the clock) and each server's model id, both logged."""
    servers = [Server(name, url) for name, url in targets]
    seed = seed if seed is not None else int(time.time())
    models = {s.name: s.model() for s in servers}
    log(f"models: {models}; seed {seed}")
    for server in servers:
        server.complete(make_ids(WARM_UP_TOKENS, f"{seed}:warm-up", max_token_id), 8)
    return servers, seed, models


def write_result(result: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log(f"wrote {path}")


def run(config: SideBySideConfig) -> dict:
    from kvcellar.bench.hardware import hardware

    servers, seed, models = connect(config.targets, config.seed, config.max_token_id)
    rounds, loads = [], []
    for index in range(config.rounds):
        prompt = make_ids(config.length, f"{seed}:prompt-{index}", config.max_token_id)
        extension = make_ids(EXTENSION_TOKENS, f"{seed}:extension-{index}", config.max_token_id)
        shared = config.length * 3 // 4
        branch = prompt[:shared] + make_ids(config.length - shared, f"{seed}:branch-{index}", config.max_token_id)
        order = list(range(len(servers)))
        order = order if index % 2 == 0 else order[::-1]
        log(f"round {index + 1}/{config.rounds} (order {', '.join(servers[i].name for i in order)})")
        before = os.getloadavg()
        rounds.append(run_round(servers, prompt, extension, branch, config.decode_tokens, order))
        loads.append({"before": before, "after": os.getloadavg()})
    text = table_text([s.name for s in servers], rounds, config.length)
    print(text)
    result = {"hardware": hardware("cpu"), "command": config.command, "models": models, "seed": seed,
              "length": config.length, "load_average": loads, "table": text, "rounds": rounds}  # fmt: skip
    write_result(result, config.out)
    return result
