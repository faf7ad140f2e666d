"""Chunked prefill on a schedule fixed by absolute positions.

The schedule of an n-token prompt (cache/reuse.py states it once): chunks of
`chunk_size` tokens aligned to position 0 up to the last whole chunk, then
one block at a time up to n, plus any extra cut asked for (message
boundaries in non-exact mode). Why fixed: a cold run and a warm run that
restored a prefix where the schedule passes then execute the very same
kernels on the same shapes, which is what makes their logits bit-identical.
Without an exact-mode cache nothing needs that: the passes end at chunk
boundaries only (no block steps), and the blocks a later prompt restores are
sliced out of them.

Why chunks longer than a block (`chunk_size_for`): each forward pass
streams all weights and runs the matrix units at the chunk's row count, so on
CPUs 1024-token chunks prefill at or below one pass's time where one-block
chunks do not (`kvcellar bench chunking`). A GPU also pays a fixed launch
cost per kernel, and a pass with no cached prefix runs the plain causal
attention kernel (cuDNN on Hopper), faster than the bottom-right one a pass
after a prefix needs: there a prompt of up to 32K tokens prefills in one
pass. The blocks are sliced out of the pass either way (figures in
docs/benchmarks.md).

Why not by default in exact mode: there only state produced on this schedule
is reused, and a schedule of chunks longer than a block is not stable as a
prompt grows. When a chat's prompt crosses a chunk boundary, the blocks it
prefilled one at a time since its last whole chunk are prefilled again, as
part of one chunk: every token of a growing chat is computed about twice.
That costs a chat or an agent loop far more than long chunks gain a cold
prompt (`kvcellar bench --scenarios chat,agent`; docs/benchmarks.md).

The row-invariant schedule (exact mode on CPU, models with only full
attention; `invariant_chunk_ends`): a pass may start at any block boundary
and run up to `chunk_size` tokens, as long as it has at least `min_rows`
tokens. Why that is exact: every operation of such a model computes a token's
row alone (norms, rotary, activations, linear layers), except attention,
which the engine then cuts into query pieces at absolute block multiples
(engine/attention.py). The CPU's matrix kernels round a row the same way in
any pass of `min_rows` rows or more (fewer rows take other kernels), so a
block's K/V and the last token's logits are bit for bit those of one pass
over the whole prompt. That property belongs to the machine's math library,
so the engine checks it when it loads (engine/invariance.py) and keeps the
block schedule where it does not hold. What it buys: a cold prompt prefills
in passes of `chunk_size`, and a chat or an agent loop still restores at
every block boundary.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable

import torch

from kvcellar.cache.reuse import full_chunks_end
from kvcellar.config import PREFILL_CHUNK_SIZE
from kvcellar.kv.layout import ModelLayout

log = logging.getLogger(__name__)

# (chunk start, chunk end, the next-token logits at end - 1: only for the chunk that ends the prompt, else None)
ChunkHook = Callable[[int, int, "torch.Tensor | None"], None]

_NO_LOGITS = torch.empty(0, dtype=torch.long)  # `logits_to_keep` that skips the LM head (no logits wanted)


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model: object, cache: object) -> dict:
    """The forward's keyword for the K/V cache: `cache` in newer transformers, `past_key_values` before.

    Newer releases still take `past_key_values` but warn on every process's first forward.
    """
    return {_cache_keyword_of(type(model)): cache}


def chunk_size_for(requested: int | None, block_size: int, layout: ModelLayout, device_type: str, exact: bool) -> int:
    """The prefill chunk for this model and device: `requested`, or by default one block, except with no
    exact-mode cache (`exact` False) on a device with a `config.PREFILL_CHUNK_SIZE` (CPU, CUDA): that many
    tokens, rounded up to whole blocks (see the module doc for both).

    Longer chunks need every layer to be full attention (a recurrent or sliding-window layer cannot hand
    over its state at a block boundary inside a chunk); otherwise one block, with a warning if asked for more.
    """
    long_pass = PREFILL_CHUNK_SIZE.get(device_type) if not exact else None
    if requested is None:
        wanted = -(-long_pass // block_size) * block_size if long_pass else block_size
    else:
        wanted = requested
    if wanted > block_size and not layout.only_full_attention:
        if requested is not None:
            log.warning(
                "prefill chunk of %d tokens ignored: this model's layers (%s) need one chunk per block (%d tokens)",
                requested, layout.describe() if layout.is_cacheable else "uncacheable", block_size,
            )  # fmt: skip
        return block_size
    return wanted


def chunk_ends(
    start: int, end: int, block_size: int, extra_cuts: Iterable[int] = (), chunk_size: int | None = None,
    steps_tail: bool = True,
) -> list[int]:
    """Sorted chunk end positions in (start, end]: chunk then block boundaries, extra cuts, and `end`.

    `steps_tail` False (no exact-mode cache: nothing needs a later, longer prompt to pass where this one
    did): no block steps after the last whole chunk, only chunk boundaries (so one block per pass still
    ends each pass at a block end, where a recurrent or sliding-window layer's state is checkpointed).
    """
    chunk = chunk_size or block_size
    if not steps_tail:
        ends = set(range((start // chunk + 1) * chunk, end, chunk))
        ends.update(cut for cut in extra_cuts if start < cut < end)
        ends.add(end)
        return sorted(ends)
    chunks_end = full_chunks_end(end, chunk)
    ends = set(range((start // chunk + 1) * chunk, chunks_end + 1, chunk))
    ends.update(range(max(start, chunks_end) // block_size * block_size + block_size, end, block_size))
    ends.update(cut for cut in extra_cuts if start < cut < end)
    ends.add(end)
    return sorted(ends)


def invariant_chunk_ends(start: int, end: int, chunk_size: int, min_rows: int) -> list[int]:
    """Chunk ends in (start, end] for the row-invariant schedule: at multiples of `chunk_size`, then `end`,
    with no chunk shorter than `min_rows` (a short one is merged into the next; only a whole range
    shorter than `min_rows` is one short chunk)."""
    ends: list[int] = []
    position = start
    for cut in [*range((start // chunk_size + 1) * chunk_size, end, chunk_size), end]:
        if cut - position >= min_rows or cut == end:
            if cut == end and ends and cut - position < min_rows:
                ends.pop()  # the last chunk would be short: the one before runs on to the end
            ends.append(cut)
            position = cut
    return ends


def prefill_ends(
    start: int, num_tokens: int, block_size: int, extra_cuts: Iterable[int] = (), chunk_size: int | None = None,
    min_rows: int | None = None, steps_tail: bool = True,
) -> list[int]:
    """The end of each forward pass of a prefill of [start, num_tokens): with `min_rows`, the row-invariant
    schedule (`invariant_chunk_ends`; no extra cuts), else the fixed one (`chunk_ends`, with `steps_tail`)."""
    if min_rows is not None:
        return invariant_chunk_ends(start, num_tokens, chunk_size or block_size, min_rows)
    return chunk_ends(start, num_tokens, block_size, extra_cuts, chunk_size, steps_tail)


def run_chunk(model: torch.nn.Module, cache: object, token_ids: torch.Tensor, start: int, end: int) -> torch.Tensor | None:
    """One pass over tokens [start, end) of `token_ids` (1-D, the whole prompt); the next-token logits
    ([vocab]) when the pass ends the prompt, else None (the LM head skipped)."""
    last = end == token_ids.shape[0]
    keep = 1 if last else _NO_LOGITS.to(token_ids.device)
    output = model(input_ids=token_ids[start:end].unsqueeze(0), **cache_argument(model, cache), use_cache=True,
                   logits_to_keep=keep)
    return output.logits[0, -1] if last else None


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    cache: object,
    token_ids: torch.Tensor,
    start: int,
    block_size: int,
    extra_cuts: Iterable[int] = (),
    on_chunk_end: ChunkHook | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
    chunk_size: int | None = None,
    min_rows: int | None = None,
    steps_tail: bool = True,
) -> torch.Tensor | None:
    """Run tokens [start, len) through `model` into `cache`; return the next-token logits ([vocab]).

    `token_ids` is a 1-D tensor on the model's device holding the whole prompt; the passes end at
    `prefill_ends`. Returns None when cancelled between chunks. Chunks before the last skip the LM head.
    """
    logits = None
    position = start
    for end in prefill_ends(start, token_ids.shape[0], block_size, extra_cuts, chunk_size, min_rows, steps_tail):
        if is_cancelled():
            return None
        logits = run_chunk(model, cache, token_ids, position, end)
        if on_chunk_end is not None:
            on_chunk_end(position, end, logits)
        position = end
    return logits
