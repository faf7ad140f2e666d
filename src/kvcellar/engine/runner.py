"""What the scheduler (engine/scheduler.py) does to one request on the worker thread: look up, restore,
prefill, decode steps, and keeping the finished request's buffers.

Operations: `RequestRunner.lookup`, `.start_prompt` (restore, plan the passes: a `PromptPass`), `.run_pass`,
`.run_last_passes` (several prompts' last passes in one forward), `.count_prefill`, `.prefill_prompt` (all of
them for a whole prompt at once: tests and measurements), `.decode_step`, `.keep_buffers`, `.time_prefill`, `.fit_threads`, `.synchronize`.
On CPU the runner keeps the K/V buffers of the request that ended last for the
next one (`kv.buffer_pool`): a fresh buffer of an 8K request faults in ~230k
pages while a restore or prefill writes it. It then trims the freed heap (`heap.py`).
On CUDA it keeps them too, for the decode graphs that read them (`graph_decode.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcellar.engine.batch_prefill import PromptRows, prefill_rows
from kvcellar.engine.graph_decode import GraphDecoder
from kvcellar.engine.heap import trim_heap
from kvcellar.engine.loader import LoadedModel
from kvcellar.engine.prefill import cache_argument, prefill, prefill_ends, run_chunk
from kvcellar.kv.adapter import DisabledPrefixCache, ModelPrefixCache, PendingRestore, Restored
from kvcellar.engine.request import GenerationRequest, Timings
from kvcellar.engine.threads import ThreadSizer
from kvcellar.kv.buffer_pool import KvBufferPool
from kvcellar.kv.growing_layer import new_cache


@dataclass
class PromptPass:
    """The rest of a prompt's prefill: the passes still to run (their ends), one per `RequestRunner.run_pass`."""

    ids: torch.Tensor
    ends: list[int]
    position: int
    capture: Callable | None
    first: int = 0  # where the prefill began (after the restored prefix)
    seconds: float = 0.0


class RequestRunner:
    def __init__(
        self, loaded: LoadedModel, prefix_cache: ModelPrefixCache | DisabledPrefixCache, block_size: int, chunk_size: int,
        min_rows: int | None = None, steps_tail: bool = True, threads: ThreadSizer | None = None,
    ) -> None:
        self.loaded = loaded
        self.prefix_cache = prefix_cache
        self.block_size = block_size
        self.chunk_size = chunk_size  # prefill chunk, a multiple of block_size (engine/prefill.py)
        self.min_rows = min_rows  # set: the row-invariant schedule (engine/prefill.py), else the fixed one
        self.steps_tail = steps_tail  # the fixed schedule's block steps after the last chunk (exact mode only)
        self.threads = threads  # set: CPU threads follow the cores other processes leave free (engine/threads.py)
        self.eos_ids = loaded.eos_token_ids
        # CUDA: decode steps replay graphs, which read fixed K/V buffers (engine/graph_decode.py), so there too
        # one request's buffers are kept for the next. MPS: the allocator's reuse is enough.
        self.graphs = GraphDecoder(loaded.model, loaded.device) if loaded.device.type == "cuda" else None
        self.kv_buffers = KvBufferPool() if loaded.device.type in ("cpu", "cuda") else None

    @torch.inference_mode()
    def time_prefill(self) -> None:
        """Prefill one block of fixed token ids on a throwaway cache (nothing stored), after one untimed
        warm-up pass, and feed its rate to the cost model.

        Without a measured rate the cost model restores every hit it finds, so a process started on a
        filled cache folder loaded its first hits from disk even where recomputing was faster (a small
        model on a fast GPU, docs/benchmarks.md). Only caches with a
        slower tier to weigh (`wants_prefill_rate`) pay these two forwards at start-up.
        """
        if not self.prefix_cache.wants_prefill_rate():
            return
        vocab = self.loaded.model.get_input_embeddings().num_embeddings
        length = max(1, min(self.block_size, self.loaded.context_length - 1))
        ids = torch.arange(length, device=self.loaded.device) % vocab
        # Twice, timing the second: a process's first forward pays one-time costs (on CUDA, kernel
        # loading), and a rate taken from it understates the prefill speed, so the first restart hits
        # would load from disk what recomputing serves faster.
        for _ in range(2):
            cache = new_cache(self.loaded.model.config, length, None)  # throwaway: never the pool's buffers
            started = time.perf_counter()
            prefill(self.loaded.model, cache, ids, 0, self.block_size, chunk_size=self.chunk_size, min_rows=self.min_rows,
                    steps_tail=self.steps_tail)
            if self.loaded.device.type == "cuda":
                torch.cuda.synchronize(self.loaded.device)
        self.prefix_cache.record_prefill(length, time.perf_counter() - started)

    def keep_buffers(self, cache: object, block_keys: Sequence[bytes]) -> None:
        """CPU: keep a finished request's K/V buffers for the next one, with the K/V of the blocks `block_keys`.

        Only the prompt's blocks: generated tokens' K/V come from decode steps, off the prefill schedule.
        The next request adopts the blocks it shares with them in place (kv/buffer_pool.py); then the
        heap is trimmed, so the freed temporaries leave RSS before the caller sees the end (heap.py).
        """
        if self.kv_buffers is None:
            return
        self.kv_buffers.give_back(cache, list(block_keys))
        if self.loaded.device.type == "cpu":
            trim_heap()

    def prefill_prompt(
        self, request: GenerationRequest, is_cancelled: Callable[[], bool] = lambda: False, timings: Timings | None = None
    ) -> tuple[Restored, torch.Tensor | None]:
        """Restore the longest cached prefix, prefill the rest, all at once; returns the cache state and the
        next-token logits (None when cancelled part-way). The scheduler runs the same steps a pass at a time."""
        timings = timings if timings is not None else Timings()
        restored, prompt = self.start_prompt(self._lookup(request, timings), request, timings)
        logits = restored.logits
        while prompt is not None and prompt.ends:
            if is_cancelled():
                logits = None
                break
            logits = self.run_pass(prompt, restored.cache)
            self.fit_threads()
        if prompt is not None:
            self.count_prefill(prompt, timings)
        return restored, logits

    def _lookup(self, request: GenerationRequest, timings: Timings) -> PendingRestore:
        with self.prefix_cache.computing():
            pending = self.prefix_cache.lookup(list(request.prompt_ids), request.prompt.block_keys, request.cache_salt)
        timings.lookup_s = pending.lookup_s
        return pending

    def start_prompt(
        self, pending: PendingRestore, request: GenerationRequest, timings: Timings
    ) -> tuple[Restored, PromptPass | None]:
        """Copy the held entries into the request's cache; the passes that prefill the rest (None: the whole
        prompt was restored, with its logits)."""
        prompt = list(request.prompt_ids)
        capacity = min(len(prompt) + request.params.max_tokens, self.loaded.context_length)
        # Background disk writes step aside until the first token: restore and prefill are what TTFT is made of.
        with self.prefix_cache.computing():
            restored = pending.build(capacity, self.kv_buffers)
        timings.restore_s += restored.restore_s
        timings.num_resident_tokens = restored.num_resident_tokens
        if restored.logits is not None:
            return restored, None
        ids = torch.tensor(prompt, dtype=torch.long, device=self.loaded.device)
        capture = self.prefix_cache.capture_prompt_hook(prompt, request.prompt.block_keys, request.segments,
                                                        restored.cache, request.cache_salt)  # fmt: skip
        cuts = self.prefix_cache.checkpoint_positions(prompt, request.segments)
        ends = prefill_ends(restored.num_tokens, len(prompt), self.block_size, cuts, self.chunk_size, self.min_rows,
                            self.steps_tail)  # fmt: skip
        return restored, PromptPass(ids, ends, restored.num_tokens, capture, first=restored.num_tokens)

    def run_pass(self, prompt: PromptPass, cache: object) -> torch.Tensor | None:
        """Run the next pass of `prompt` into `cache` and capture its blocks; the next-token logits when it
        ends the prompt, else None."""
        start, end = prompt.position, prompt.ends.pop(0)
        began = time.perf_counter()
        with self.prefix_cache.computing():
            logits = run_chunk(self.loaded.model, cache, prompt.ids, start, end)
            if prompt.capture is not None:
                prompt.capture(start, end, logits)
        self.synchronize()
        prompt.seconds += time.perf_counter() - began
        prompt.position = end
        return logits

    def run_last_passes(self, prompts: Sequence[tuple[PromptPass, object]]) -> list[torch.Tensor]:
        """Run the last pass of each (prompt, cache) in one forward (engine/batch_prefill.py) and capture their
        blocks; each prompt's next-token logits. Each prompt's pass is timed as its share of the rows."""
        passes = [PromptRows(cache, prompt.ids, prompt.position, prompt.ends[0]) for prompt, cache in prompts]
        began = time.perf_counter()
        with self.prefix_cache.computing():
            logits = prefill_rows(self.loaded.model, passes)
            for (prompt, _), rows, row_logits in zip(prompts, passes, logits):
                if prompt.capture is not None:
                    prompt.capture(rows.start, rows.end, row_logits)
        self.synchronize()
        seconds = time.perf_counter() - began
        total = sum(rows.end - rows.start for rows in passes)
        for (prompt, _), rows in zip(prompts, passes):
            prompt.ends.pop(0)
            prompt.position = rows.end
            prompt.seconds += seconds * (rows.end - rows.start) / total
        return logits

    def count_prefill(self, prompt: PromptPass, timings: Timings) -> None:
        """Add the tokens and seconds of `prompt`'s prefill so far to `timings` and to the cost model."""
        computed = prompt.position - prompt.first
        timings.prefill_s += prompt.seconds
        timings.num_prefill_tokens += computed
        self.prefix_cache.record_prefill(computed, prompt.seconds)

    def lookup(self, request: GenerationRequest, timings: Timings) -> PendingRestore:
        """The cache's longest match for the prompt, its entries held until restored or released."""
        return self._lookup(request, timings)

    def fit_threads(self) -> None:
        if self.threads is not None:
            self.threads.adjust()

    def synchronize(self) -> None:
        """CUDA: wait for the queued kernels, so a pass's time is its true time (free: the next sample waits anyway)."""
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)

    def decode_step(self, token: int, cache: object) -> torch.Tensor:
        """Feed `token`, return the next-token logits: a CUDA graph's replay where one covers the step, else eager."""
        if self.graphs is not None:
            logits = self.graphs.step(token, cache)
            if logits is not None:
                return logits
        output = self.loaded.model(input_ids=torch.tensor([[token]], device=self.loaded.device),
                                   **cache_argument(self.loaded.model, cache), use_cache=True)  # fmt: skip
        return output.logits[0, -1]
