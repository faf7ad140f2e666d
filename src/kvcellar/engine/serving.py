"""What a caller that serves requests needs from an engine: the `ServingEngine` protocol.

Operations (the protocol's members): `stream` (queue a request, iterate its
events; `.cancel()` stops it), `encode` (prompt or messages -> ids and
segments), `probe`, `cache_stats`, `clear_cache`, `set_cache_budget`,
`close`, `load_report` (running / waiting requests and their K/V); read-only `config`, `model_name`,
`tokenizer`, `context_length`, `tier_names`, `queue_depth`, `decode_batches` (the batch-size histogram),
`grammars` (constrained decoding).

The server (`kvcellar.server`) and `ChatSession` (`kvcellar.session`) are
typed against this protocol, never against `Engine`: they sit above the
engine and use only these members, so a test may hand them any object that
has them. `Engine` satisfies it (tests/engine/test_cache_api.py checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvcellar.chat.tools import Tool
from kvcellar.config import EngineConfig
from kvcellar.engine.prepared import PreparedPrompt
from kvcellar.engine.request import PromptSegments, StreamEvent
from kvcellar.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from kvcellar.cache.registry import DrainReport
    from kvcellar.engine.constraint import Grammars
    from kvcellar.engine.memory import DecodeBatchStats
    from kvcellar.engine.scheduler import Load
    from kvcellar.cache.report import CacheReport, ProbeResult


class EventStream(Protocol):
    """The events of one queued request; the last carries `.result`. `cancel()` works from any thread."""

    def __iter__(self) -> Iterator[StreamEvent]: ...

    def __next__(self) -> StreamEvent: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class ServingEngine(Protocol):
    config: EngineConfig  # as the engine resolved it (a concrete block size and prefill chunk)
    decode_batches: DecodeBatchStats  # how many requests each decode pass fed
    grammars: Grammars  # compiles and checks the grammars of constrained requests

    @property
    def model_name(self) -> str: ...

    @property
    def tokenizer(self) -> object: ...  # the model's transformers tokenizer

    @property
    def context_length(self) -> int: ...

    @property
    def tier_names(self) -> list[str]: ...

    @property
    def queue_depth(self) -> int: ...

    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None, tools: Sequence[Tool] = (),
               keep_through: int | None = None) -> tuple[list[int], PromptSegments]: ...  # fmt: skip

    def prepare(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
        segments: PromptSegments | None = None,
        cache_salt: str = "",
        max_tokens: int | None = None,
    ) -> PreparedPrompt: ...

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
        segments: PromptSegments | None = None,
        prepared: PreparedPrompt | None = None,
        params: SamplingParams | None = None,
        cache_salt: str = "",
        **sampling: object,
    ) -> EventStream: ...

    def probe(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        prompt_ids: Sequence[int] | None = None,
        prepared: PreparedPrompt | None = None,
        cache_salt: str = "",
    ) -> ProbeResult: ...

    def cache_report(self, salts: Callable[[str], bool] | None = None) -> CacheReport: ...

    def cache_stats(self, salts: Callable[[str], bool] | None = None) -> dict: ...

    def clear_cache(self, tier: str | None = None) -> None: ...

    def set_cache_budget(self, tier: str, num_bytes: int) -> None: ...

    def load_report(self) -> Load: ...

    def close(self, *, drain_timeout_s: float | None = None) -> DrainReport | None: ...
