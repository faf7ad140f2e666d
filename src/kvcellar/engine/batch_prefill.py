"""One forward pass that prefills the last pass of several prompts at once, each into its own K/V cache.

Operations: `prefill_rows(model, passes) -> [logits | None]`, `PassKv` (engine/attention.py).

Why: short prompts that arrive together (many users' questions under one
cached system prompt, an agent's fan-out) each need one short pass, and a
pass of 64 rows runs the matrix units well below the rate of a few hundred
(docs/benchmarks.md). So their tokens go through the linear layers as one
pass, while each prompt writes its own K/V and attends to its own keys only
(`_PassLayers`), exactly as its pass alone calls attention. Their first
tokens then come out together.

Exact mode keeps its promise where the engine batches (engine/scheduler.py):
only on the row-invariant schedule, whose load-time check found every row of a
pass of at least ROW_INVARIANT_MIN_ROWS rows computed alike in any such pass;
each prompt's part is such a pass, and its attention is the same call. The
LM head runs on the rows whose pass ends their prompt, at most
EXACT_DECODE_MAX_ROWS of them (a decode step's few-rows kernel, which
computes a row as alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvcellar.engine.attention import PassKv
from kvcellar.engine.batch_decode import PerRequestCaches, no_masks
from kvcellar.engine.prefill import cache_argument


@dataclass(frozen=True)
class PromptRows:
    """Tokens [start, end) of `ids` (a whole prompt, 1-D on the model's device), prefilled into `cache`."""

    cache: object
    ids: torch.Tensor
    start: int
    end: int

    @property
    def ends_prompt(self) -> bool:
        return self.end == self.ids.shape[0]


class _PassLayers(PerRequestCaches):
    """What the model's layers see as the cache: `update` splits the pass's K/V by prompt, writes each part into
    its own prompt's layer, and hands attention every prompt's K/V with its query count."""

    def __init__(self, passes: Sequence[PromptRows]) -> None:
        self._caches = [rows.cache for rows in passes]
        self._sizes = tuple(rows.end - rows.start for rows in passes)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        for cache, key_part, value_part in zip(self._caches, key_states.split(self._sizes, dim=2),
                                               value_states.split(self._sizes, dim=2)):  # fmt: skip
            k, v = cache.layers[layer_idx].update(key_part, value_part)
            keys.append(k)
            values.append(v)
        return PassKv(tuple(keys), self._sizes), PassKv(tuple(values), self._sizes)


@torch.inference_mode()
def prefill_rows(model: torch.nn.Module, passes: Sequence[PromptRows]) -> list[torch.Tensor | None]:
    """Run every pass in one forward; each one's next-token logits ([vocab]) where it ends its prompt, else None."""
    device = model.device
    input_ids = torch.cat([rows.ids[rows.start : rows.end] for rows in passes]).unsqueeze(0)
    positions = torch.cat([torch.arange(rows.start, rows.end, device=device) for rows in passes]).unsqueeze(0)
    offsets, last_rows = 0, []
    for rows in passes:
        offsets += rows.end - rows.start
        if rows.ends_prompt:
            last_rows.append(offsets - 1)
    keep = torch.tensor(last_rows, dtype=torch.long, device=device)  # empty: the LM head is skipped
    output = model(input_ids=input_ids, position_ids=positions, attention_mask=no_masks(model),
                   **cache_argument(model, _PassLayers(passes)), use_cache=True, logits_to_keep=keep)  # fmt: skip
    logits = iter(output.logits[0])
    return [next(logits) if rows.ends_prompt else None for rows in passes]
