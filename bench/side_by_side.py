"""Side by side: kvcellar and a peer server (llama.cpp's llama-server, vLLM) on the same model, prompts and machine.

Run (both servers already up, each on its own port, serving the same weights):

    PYTHONPATH=src .venv/bin/python bench/side_by_side.py \\
        --target kvcellar=http://127.0.0.1:8000 --target llama.cpp=http://127.0.0.1:8001 \\
        --length 2048 --rounds 3 --out bench-out/side_by_side.json

Every request is a streaming POST /v1/completions with a token-id prompt, temperature 0 and
`ignore_eos`; times are the client's. Per round, each target (in alternating order, so drift
hits both alike) gets a fresh seeded prompt P of `--length` ids, the same ids for every target:

| row | request | figure |
|---|---|---|
| cold | P, 1 token | time to first token |
| exact repeat | P again, 16 tokens | time to first token |
| extension | P + 64 new ids, 1 token | time to first token |
| decode | P + 64 again, `--decode-tokens` tokens | tokens/s from the first to the last token |

A warm-up request (other ids) goes to each target first. The seed defaults to the clock, so a
second run against the same servers is cold again; it is recorded. The load average is sampled
around every round: compare runs only at similar load. Prints a markdown table (median, min–max,
ratio of the first target to each other one) and writes every raw sample to `--out`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from kvcellar.bench.hardware import hardware
from kvcellar.bench.scenarios import make_ids

EXTENSION_TOKENS, REPEAT_TOKENS = 64, 16
ROWS = ("cold", "exact repeat", "extension", "decode")


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
        """Stream one completion: first- and last-token times (s from the request), tokens, the server's cache figure."""
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
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    stamps.append(time.perf_counter() - started)
        finally:
            conn.close()
        if not stamps:
            raise RuntimeError(f"{self.name}: the stream carried no token")
        tokens = usage.get("completion_tokens") or len(stamps)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return {"ttft_s": stamps[0], "last_s": stamps[-1], "tokens": tokens, "cached_tokens": cached}


def run_round(servers: list[Server], prompt: list[int], extension: list[int], decode_tokens: int, order: list[int]) -> dict:
    out: dict[str, dict] = {}
    for index in order:
        server = servers[index]
        cold = server.complete(prompt, 1)
        repeat = server.complete(prompt, REPEAT_TOKENS)
        extend = server.complete(prompt + extension, 1)
        decode = server.complete(prompt + extension, decode_tokens)
        rate = (decode["tokens"] - 1) / max(decode["last_s"] - decode["ttft_s"], 1e-9)
        out[server.name] = {"cold": cold["ttft_s"], "exact repeat": repeat["ttft_s"], "extension": extend["ttft_s"],
                            "decode": rate, "raw": {"cold": cold, "exact repeat": repeat, "extension": extend,
                                                    "decode": decode}}  # fmt: skip
        print(f"  {server.name}: cold {cold['ttft_s']:.3f} s, repeat {repeat['ttft_s']:.3f} s, "
              f"+{len(extension)} {extend['ttft_s']:.3f} s, decode {rate:.1f} tok/s", file=sys.stderr, flush=True)
    return out


def _cell(values: list[float], unit: str) -> str:
    fmt = "{:.1f}" if unit == "tok/s" else "{:.3f}"
    median = fmt.format(statistics.median(values))
    return f"{median} {unit} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def table(names: list[str], rounds: list[dict], length: int) -> str:
    head = f"| {length}-token prompt | " + " | ".join(names) + " | " + " | ".join(
        f"{names[0]} ÷ {other}" for other in names[1:]) + " |"  # fmt: skip
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for row in ROWS:
        unit = "tok/s" if row == "decode" else "s"
        values = {name: [r[name][row] for r in rounds] for name in names}
        ratios = [statistics.median(values[names[0]]) / statistics.median(values[other]) for other in names[1:]]
        lines.append(f"| {row} | " + " | ".join(_cell(values[n], unit) for n in names) + " | "
                     + " | ".join(f"{ratio:.2f}x" for ratio in ratios) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, help="NAME=URL (repeat; the first is the one compared)")
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--max-token-id", type=int, default=8000, help="prompt ids are drawn from [100, this)")
    parser.add_argument("--seed", type=int, default=None, help="prompt seed (default: the clock, recorded)")
    parser.add_argument("--out", default="bench-out/side_by_side.json")
    args = parser.parse_args(argv)
    servers = [Server(*spec.split("=", 1)) for spec in args.target]
    if len(servers) < 2 or any(not s.netloc for s in servers):
        parser.error("give at least two --target NAME=http://HOST:PORT")
    seed = args.seed if args.seed is not None else int(time.time())
    models = {s.name: s.model() for s in servers}
    print(f"models: {models}; seed {seed}", file=sys.stderr)
    for server in servers:  # warm-up: first-request costs (allocator, threads) stay out of the figures
        server.complete(make_ids(256, f"{seed}:warm-up", args.max_token_id), 8)
    rounds, loads = [], []
    for index in range(args.rounds):
        prompt = make_ids(args.length, f"{seed}:prompt-{index}", args.max_token_id)
        extension = make_ids(EXTENSION_TOKENS, f"{seed}:extension-{index}", args.max_token_id)
        order = list(range(len(servers)))
        order = order if index % 2 == 0 else order[::-1]
        print(f"round {index + 1}/{args.rounds} (order {', '.join(servers[i].name for i in order)})", file=sys.stderr)
        before = os.getloadavg()
        rounds.append(run_round(servers, prompt, extension, args.decode_tokens, order))
        loads.append({"before": before, "after": os.getloadavg()})
    names = [s.name for s in servers]
    text = table(names, rounds, args.length)
    print(text)
    result = {"hardware": hardware("cpu"), "command": " ".join(sys.argv), "models": models, "seed": seed,
              "length": args.length, "load_average": loads, "table": text, "rounds": rounds}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
