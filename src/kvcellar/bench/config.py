"""What one `kvcellar bench` run measures: sizes, modes, target, output folder.

Operations: `WorkloadSizes` (FULL_SIZES, QUICK_SIZES), `BenchConfig`
(validated on construction), `BenchConfig.to_json` / `from_json` (the form
handed to a phase's fresh process), `format_length` (2048 -> "2K").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvcellar.config import CacheConfig, EngineConfig

DEFAULT_LENGTHS = (2048, 8192)
LONG_BLOCK_LENGTHS = (8192, 32768)  # blocks of 2048 or more (the CUDA default): 2K would be one block
QUICK_LENGTHS = (1024, 2048)
# The 0.6b model's tokenizer has 8192 ids; llama.cpp's anchor runs used ids in [100, 8000) too.
DEFAULT_MAX_TOKEN_ID = 8000


@dataclass(frozen=True, slots=True)
class WorkloadSizes:
    """Token counts of the realistic workloads (every prompt is seeded random token ids)."""

    repeats: int = 3  # prompts per length in cold / exact / nearest
    chat_conversations: int = 4
    chat_turns: int = 4
    chat_system_tokens: int = 512
    chat_user_tokens: int = 128
    chat_assistant_tokens: int = 128
    doc_documents: int = 3
    doc_questions: int = 3
    doc_tokens: int = 4096
    doc_question_tokens: int = 64
    agent_steps: int = 6
    agent_system_tokens: int = 512
    agent_call_tokens: int = 64
    agent_output_tokens: int = 384

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"workload size {item.name} must be an integer >= 1 (got {value!r})")


FULL_SIZES = WorkloadSizes()
QUICK_SIZES = WorkloadSizes(
    repeats=3, chat_conversations=2, chat_turns=3, chat_system_tokens=256, chat_user_tokens=64, chat_assistant_tokens=64,
    doc_documents=2, doc_questions=2, doc_tokens=1024, doc_question_tokens=32,
    agent_steps=4, agent_system_tokens=256, agent_call_tokens=32, agent_output_tokens=128,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One benchmark run. `engine` is None only with `url` (the server has its own model)."""

    out_dir: str
    engine: EngineConfig | None = None
    url: str | None = None
    api_key: str | None = None
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    sizes: WorkloadSizes = field(default_factory=WorkloadSizes)
    modes: tuple[str, ...] | None = None  # None: every mode that applies to the target
    scenarios: tuple[str, ...] | None = None  # None: every scenario
    # Tokens generated per request: TTFT as a client asking for an answer sees it (a one-token request
    # can be served from stored logits with no forward at all); restore and prefill times stay columns.
    max_tokens: int = 16
    seed: int = 0
    max_token_id: int = DEFAULT_MAX_TOKEN_ID
    server_block_size: int = 256  # with url: the server's block size (where "inside the last block" is)
    cache_dir: str | None = None  # base folder of the disk-tier modes (default: <out_dir>/cache)
    keep_cache: bool = False
    isolate: bool = True  # each phase in a fresh process (memory peaks do not mix); False for tests
    quick: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        if (self.engine is None) == (self.url is None):
            raise ValueError("give exactly one target: a model (in-process) or --url http://HOST:PORT (a running server)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https:// (got {self.url!r})")
        if not self.lengths or any(not isinstance(n, int) for n in self.lengths):
            raise ValueError(f"--lengths must list prompt lengths in tokens, e.g. 2048,8192 (got {self.lengths!r})")
        block = self.block_size
        short = [n for n in self.lengths if n < 2 * block]
        if short:
            raise ValueError(f"prompt lengths {short} are shorter than two blocks of {block} tokens: the nearest-prefix "
                             "scenario diverges inside the last block; use longer --lengths or a smaller --block-size")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1 (got {self.max_tokens})")
        if self.max_token_id < 200:
            raise ValueError(f"--max-token-id must be >= 200: prompts use ids from 100 up (got {self.max_token_id})")

    @property
    def block_size(self) -> int:
        return self.engine.block_size if self.engine is not None else self.server_block_size

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> BenchConfig:
        data = dict(data)
        if data.get("engine") is not None:
            engine = dict(data["engine"])
            engine["cache"] = CacheConfig(**engine["cache"])
            data["engine"] = EngineConfig(**engine)
        data["sizes"] = WorkloadSizes(**data["sizes"])
        for name in ("lengths", "modes", "scenarios"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


def default_lengths(block_size: int, quick: bool) -> tuple[int, ...]:
    """Prompt lengths when none are given: each at least two blocks (the nearest-prefix scenario needs it)."""
    base = QUICK_LENGTHS if quick else LONG_BLOCK_LENGTHS if block_size >= 2048 else DEFAULT_LENGTHS
    return tuple(n for n in base if n >= 2 * block_size) or (2 * block_size, 4 * block_size)


def parse_lengths(text: str) -> tuple[int, ...]:
    """"2048,8K" -> (2048, 8192); a K suffix means x1024."""
    out = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        try:
            out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
        except ValueError:
            raise ValueError(f"cannot read the prompt length {item!r}: write tokens, e.g. --lengths 2048,8192 or 2K,8K") from None
    return tuple(out)


def format_length(num_tokens: int) -> str:
    """2048 -> "2K", 32768 -> "32K", 512 -> "512"."""
    return f"{num_tokens // 1024}K" if num_tokens % 1024 == 0 else str(num_tokens)
