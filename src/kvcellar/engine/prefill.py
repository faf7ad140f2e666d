"""Block-aligned chunked prefill.

Chunks end at every multiple of the block size (aligned to absolute position
0), at the prompt's end, and at any extra cut point asked for (message
boundaries in non-exact mode). Why aligned: a cold run and a warm run that
restored a prefix at a block boundary then execute the very same kernels on
the same shapes, which is what makes their logits bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

ChunkHook = Callable[[int, torch.Tensor], None]  # (end position, next-token logits at end - 1)


def chunk_ends(start: int, end: int, block_size: int, extra_cuts: Iterable[int] = ()) -> list[int]:
    """Sorted chunk end positions in (start, end]: block boundaries, extra cuts, and `end`."""
    first_boundary = (start // block_size + 1) * block_size
    ends = set(range(first_boundary, end, block_size))
    ends.update(cut for cut in extra_cuts if start < cut < end)
    ends.add(end)
    return sorted(ends)


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
) -> torch.Tensor | None:
    """Run tokens [start, len) through `model` into `cache`; return the next-token logits ([vocab]).

    `token_ids` is a 1-D tensor on the model's device holding the whole prompt.
    Returns None when cancelled between chunks.
    """
    logits = None
    position = start
    for end in chunk_ends(start, token_ids.shape[0], block_size, extra_cuts):
        if is_cancelled():
            return None
        output = model(input_ids=token_ids[position:end].unsqueeze(0), past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = output.logits[0, -1]
        if on_chunk_end is not None:
            on_chunk_end(end, logits)
        position = end
    return logits
