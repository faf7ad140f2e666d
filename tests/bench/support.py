"""Shared by the bench tests: tiny workloads over the tiny qwen3 folder (block 16)."""

from __future__ import annotations

from pathlib import Path

from kvcellar.bench import BenchConfig, WorkloadSizes
from kvcellar.config import CacheConfig, EngineConfig

SRC = Path(__file__).resolve().parents[2] / "src"
BLOCK = 16
LENGTHS = (64, 128)
TINY_SIZES = WorkloadSizes(
    repeats=2, chat_conversations=2, chat_turns=3, chat_system_tokens=32, chat_user_tokens=12, chat_assistant_tokens=10,
    doc_documents=2, doc_questions=2, doc_tokens=80, doc_question_tokens=8,
    agent_steps=3, agent_system_tokens=32, agent_call_tokens=6, agent_output_tokens=20,
)  # fmt: skip


def tiny_config(model_dir: Path, out_dir: Path, **changes: object) -> BenchConfig:
    """Every phase in this process (isolate=False) unless `changes` say otherwise."""
    engine = EngineConfig(str(model_dir), device="cpu", block_size=BLOCK, cache=CacheConfig())
    fields = {"out_dir": str(out_dir), "engine": engine, "lengths": LENGTHS, "sizes": TINY_SIZES, "isolate": False}
    return BenchConfig(**(fields | changes))
