"""Scenarios: seeded synthetic token-id prompts, in the order a workload sends them.

Operations: `make_ids(n, key, hi)`, `BenchRequest`, `build_requests(kind, config, hi)`,
`SCENARIOS` (kind -> builder), `cold_label(label)`.

Every prompt is a pure function of (seed, scenario, index, sizes): two runs,
two modes or two processes send the same token ids, with no tokenizer cost.
Ids are drawn from [100, hi). Labels name table rows: "cold@2K", "exact@2K",
"nearest@2K", "chat", "doc-qa", "agent", "restart@2K".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvcellar.bench.config import BenchConfig, format_length

PREFIX, CHAT, DOC_QA, AGENT, RESTART = "prefix", "chat", "doc-qa", "agent", "restart"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload. Requests with the same `salt_key` share a cache namespace."""

    label: str
    ids: tuple[int, ...]
    salt_key: str
    kind: str  # "cold", "exact", "nearest", "restart" for the prefix rows; the scenario name otherwise
    length: int = 0  # the prefix rows' nominal length (their no-cache baseline is cold@length)


def make_ids(n: int, key: int | str, hi: int) -> list[int]:
    """n token ids in [100, hi), fixed by `key` (random.Random seeds str keys deterministically)."""
    return random.Random(key).choices(range(100, hi), k=n)


def cold_label(label: str) -> str:
    """The row whose no-cache TTFT a prefix row is compared with: exact@2K -> cold@2K."""
    return "cold@" + label.split("@", 1)[1] if "@" in label else label


def _prefix_key(length: int, index: int, seed: int) -> int:
    # index 0 with seed 0 is random.Random(length): the token ids of the llama.cpp anchor runs (ANCHORS.md).
    return length + 1_000_000 * index + 1_000_000_000 * seed


def _prefix_prompts(config: BenchConfig, hi: int) -> list[tuple[int, int, list[int]]]:
    return [(length, i, make_ids(length, _prefix_key(length, i, config.seed), hi))
            for length in config.lengths for i in range(config.sizes.repeats)]  # fmt: skip


def prefix_requests(config: BenchConfig, hi: int) -> list[BenchRequest]:
    """Per length and repeat: a cold prompt, the same prompt again, then one diverging inside its last block."""
    half_block = max(1, config.block_size // 2)
    out = []
    for length, i, prompt in _prefix_prompts(config, hi):
        tag = format_length(length)
        diverge = length - half_block  # inside the last block [length - block, length) for a block multiple
        tail = make_ids(length - diverge, f"{config.seed}:nearest-{length}-{i}", hi)
        if tail[0] == prompt[diverge]:  # the prompts must really differ at `diverge`
            tail[0] = 100 + (tail[0] - 99) % (hi - 100)
        nearest = prompt[:diverge] + tail
        out += [BenchRequest(f"cold@{tag}", tuple(prompt), PREFIX, "cold", length),
                BenchRequest(f"exact@{tag}", tuple(prompt), PREFIX, "exact", length),
                BenchRequest(f"nearest@{tag}", tuple(nearest), PREFIX, "nearest", length)]  # fmt: skip
    return out


def restart_requests(config: BenchConfig, hi: int) -> list[BenchRequest]:
    """The prefix scenario's cold prompts again, sent by a new engine process on the same cache folder."""
    return [BenchRequest(f"restart@{format_length(length)}", tuple(prompt), PREFIX, "restart", length)
            for length, _, prompt in _prefix_prompts(config, hi)]  # fmt: skip


def chat_requests(config: BenchConfig, hi: int) -> list[BenchRequest]:
    """N conversations x T turns sharing one system prompt, round-robin (turn 1 of each, then turn 2, ...).

    Turn t's prompt is the system prompt, the earlier user / assistant messages (the
    assistant messages stand for earlier replies) and the new user message.
    """
    s, seed = config.sizes, config.seed
    system = make_ids(s.chat_system_tokens, f"{seed}:chat-system", hi)
    history = {c: list(system) for c in range(s.chat_conversations)}
    out = []
    for turn in range(s.chat_turns):
        for c in range(s.chat_conversations):
            history[c] += make_ids(s.chat_user_tokens, f"{seed}:chat-{c}-user-{turn}", hi)
            out.append(BenchRequest(CHAT, tuple(history[c]), CHAT, CHAT))
            history[c] += make_ids(s.chat_assistant_tokens, f"{seed}:chat-{c}-assistant-{turn}", hi)
    return out


def doc_requests(config: BenchConfig, hi: int) -> list[BenchRequest]:
    """D documents x Q questions each (document + question), round-robin over the documents."""
    s, seed = config.sizes, config.seed
    docs = [make_ids(s.doc_tokens, f"{seed}:doc-{d}", hi) for d in range(s.doc_documents)]
    return [BenchRequest(DOC_QA, tuple(docs[d] + make_ids(s.doc_question_tokens, f"{seed}:doc-{d}-q-{q}", hi)),
                         DOC_QA, DOC_QA)
            for q in range(s.doc_questions) for d in range(s.doc_documents)]  # fmt: skip


def agent_requests(config: BenchConfig, hi: int) -> list[BenchRequest]:
    """One agent: system + task, then each step appends a tool call and the tool's (longer) output."""
    s, seed = config.sizes, config.seed
    transcript = make_ids(s.agent_system_tokens, f"{seed}:agent-system", hi)
    out = [BenchRequest(AGENT, tuple(transcript), AGENT, AGENT)]
    for step in range(1, s.agent_steps):
        transcript += make_ids(s.agent_call_tokens, f"{seed}:agent-call-{step}", hi)
        transcript += make_ids(s.agent_output_tokens, f"{seed}:agent-output-{step}", hi)
        out.append(BenchRequest(AGENT, tuple(transcript), AGENT, AGENT))
    return out


SCENARIOS: dict[str, Callable[[BenchConfig, int], list[BenchRequest]]] = {
    PREFIX: prefix_requests,
    CHAT: chat_requests,
    DOC_QA: doc_requests,
    AGENT: agent_requests,
    RESTART: restart_requests,
}


def build_requests(kind: str, config: BenchConfig, hi: int) -> list[BenchRequest]:
    if kind not in SCENARIOS:
        raise ValueError(f"unknown scenario {kind!r}: choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[kind](config, hi)
