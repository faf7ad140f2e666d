"""What the scheduler (engine/scheduler.py) does to one request on the worker thread: look up, restore,
prefill, decode steps, and keeping the finished request's buffers.

Operations: `RequestRunner.lookup`, `.prefill_prompt` (restore and prefill a whole prompt at once: tests and
measurements), `.decode_step`, `.keep_buffers`, `.time_prefill`, `.fit_threads`, `.synchronize`.
On CPU the runner keeps the K/V buffers of the request that ended last for the
next one (`kv.buffer_pool`): a fresh buffer of an 8K request faults in ~230k
pages while a restore or prefill writes it. It then trims the freed heap (`heap.py`).
On CUDA it keeps them too, for the decode graphs that read them (`graph_decode.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from kvcellar.engine.graph_decode import GraphDecoder
from kvcellar.engine.heap import trim_heap
from kvcellar.engine.loader import LoadedModel
from kvcellar.engine.prefill import cache_argument, prefill
from kvcellar.kv.adapter import DisabledPrefixCache, ModelPrefixCache, PendingRestore, Restored
from kvcellar.engine.request import GenerationRequest, Timings
from kvcellar.engine.threads import ThreadSizer
from kvcellar.kv.buffer_pool import KvBufferPool
from kvcellar.kv.growing_layer import new_cache


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
        """Restore the longest cached prefix, prefill the rest; returns the cache state and next-token logits."""
        timings = timings if timings is not None else Timings()
        return self._restore_and_prefill(self._lookup(request, timings), request, is_cancelled, timings)

    def _lookup(self, request: GenerationRequest, timings: Timings) -> PendingRestore:
        with self.prefix_cache.computing():
            pending = self.prefix_cache.lookup(list(request.prompt_ids), request.prompt.block_keys, request.cache_salt)
        timings.lookup_s = pending.lookup_s
        return pending

    def _restore_and_prefill(
        self, pending: PendingRestore, request: GenerationRequest, is_cancelled: Callable[[], bool], timings: Timings
    ) -> tuple[Restored, torch.Tensor | None]:
        """Copy the held entries into the request's cache, then prefill the rest of the prompt.

        Returns the cache and the prompt's next-token logits (None when cancelled part-way).
        """
        prompt = list(request.prompt_ids)
        capacity = min(len(prompt) + request.params.max_tokens, self.loaded.context_length)
        # Background disk writes step aside until the first token: restore and prefill are what TTFT is made of.
        with self.prefix_cache.computing():
            restored = pending.build(capacity, self.kv_buffers)
            timings.restore_s = restored.restore_s
            timings.num_resident_tokens = restored.num_resident_tokens
            started = time.perf_counter()
            logits = restored.logits
            reached = restored.num_tokens  # the prompt position the cache stands at (a cancel stops short)
            if logits is None:
                ids = torch.tensor(prompt, dtype=torch.long, device=self.loaded.device)
                capture = self.prefix_cache.capture_prompt_hook(prompt, request.prompt.block_keys, request.segments,
                                                                restored.cache, request.cache_salt)  # fmt: skip

                def on_chunk_end(start: int, end: int, chunk_logits: torch.Tensor | None) -> None:
                    nonlocal reached
                    reached = end
                    if capture is not None:
                        capture(start, end, chunk_logits)
                    self.fit_threads()

                cuts = self.prefix_cache.checkpoint_positions(prompt, request.segments)
                logits = prefill(self.loaded.model, restored.cache, ids, restored.num_tokens, self.block_size, cuts,
                                 on_chunk_end, is_cancelled, self.chunk_size, self.min_rows, self.steps_tail)  # fmt: skip
        if self.loaded.device.type == "cuda":  # kernels run behind the CPU: wait, so prefill_s is the true time
            torch.cuda.synchronize(self.loaded.device)  # (free: sampling the first token waits for them anyway)
        timings.prefill_s = time.perf_counter() - started
        timings.num_prefill_tokens = reached - restored.num_tokens
        self.prefix_cache.record_prefill(timings.num_prefill_tokens, timings.prefill_s)
        return restored, logits

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
