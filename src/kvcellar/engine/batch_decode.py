"""One forward pass that decodes a token for each of several requests, each on its own K/V cache.

Operations: `batches_decode(model, layout) -> bool`, `decode_rows(model, tokens, caches, spans) -> logits
[B, vocab]`, `RaggedKv` (engine/attention.py).

Why per-request caches and not one paged pool: a request's cache is the
`GrowingLayer` buffers that the prefix cache restores into and captures from
(kv/adapter.py), and a decode step is bound by reading the weights, which one
pass of B rows reads once for all of them. So the pass runs the model's own
layers on a [B, 1] batch with each row's position, and `_BatchLayers.update`
appends each row's new K/V to its own request's layer and hands attention a
`RaggedKv`: the rows' K/V views, of different lengths. The attention function
(engine/attention.py) then runs each row exactly as a one-request step runs it
(same kernel, same arguments), so a row's attention is the same bits alone or
in a batch; the linear layers' few-rows kernel (engine/kernels) is
batch-invariant too. Whether the whole step is, the engine checks at load
(`rows_compute_alike`), and exact mode batches only where it is.

Rows restored from the same cache blocks (many requests under one system
prompt) hold copies of the same K/V. Each row's `RestoredSpan`s (kv/state.py)
say which entries its tokens were copied from; where a live entry covers a
whole chunk of the attention kernel's keys, `RaggedKv.shared` hands the kernel
the entry's tensors for that chunk, and the kernel reads it there once for all
those rows instead of once per row's copy: the same bytes, so the same bits.

Only models whose every layer is full attention in a `GrowingLayer` batch this
way; sliding-window and recurrent layers keep per-request state of other
shapes, so those models run one forward per request in a step
(docs/configuration.md gives the cost).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcellar.config import EXACT_DECODE_MAX_ROWS
from kvcellar.engine.attention import RaggedKv, shared_chunk_keys
from kvcellar.engine.kernels import AppendRows, CpuKernels
from kvcellar.engine.prefill import cache_argument
from kvcellar.kv.growing_layer import GrowingLayer, new_cache
from kvcellar.kv.layout import ModelLayout
from kvcellar.kv.state import RestoredSpan


# The built kernel that writes every row's new K/V in one call (engine/kernels), set by the loader; None: torch's
# copies, row by row.
_append_rows: AppendRows | None = None


def use_append_kernel(kernels: CpuKernels) -> None:
    """Write batched decode steps' K/V through the built kernel where there is one. Process-wide."""
    global _append_rows
    _append_rows = kernels.append_rows


def _shared_chunks(spans: Sequence[RestoredSpan], chunk_keys: int) -> list[tuple[int, int, dict]]:
    """(chunk, its first key in the entry, the entry's tensors) for every chunk of `chunk_keys` keys that one
    live entry of `spans` covers whole."""
    chunks = []
    for span in spans:
        payload = span.payload()
        if payload is None:  # evicted since the restore: the row reads its own copy
            continue
        first_chunk = -(-span.start // chunk_keys)
        for chunk in range(first_chunk, (span.start + span.length) // chunk_keys):
            chunks.append((chunk, chunk * chunk_keys - span.start, payload.tensors))
    return chunks


class PerRequestCaches:
    """The cache a pass over several requests hands the model: each request keeps its own cache, and attention
    (engine/attention.py) runs each one's queries on its own keys. What transformers asks of a cache while it
    builds masks answers for a mask it need not build: a model that takes no mask mapping gets a one-key
    mask, which attention then ignores for each request's own keys."""

    is_compileable = False

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def no_masks(model: torch.nn.Module) -> dict | None:
    """The attention masks of a pass over several requests' caches: none for any layer kind, since attention
    applies each request's own causal mask (engine/attention.py); None for a model without layer kinds."""
    return {kind: None for kind in set(model.config.layer_types)} if hasattr(model.config, "layer_types") else None


class _BatchLayers(PerRequestCaches):
    """What the model's layers see as the cache: `update` writes each row's K/V into its own request's layer
    and hands attention every row's K/V, with the chunks that rows read from shared entries."""

    def __init__(self, caches: Sequence[object], spans: Sequence[Sequence[RestoredSpan]]) -> None:
        self._caches = caches
        chunk_keys = shared_chunk_keys()
        self._shared = [_shared_chunks(row_spans, chunk_keys) if chunk_keys else [] for row_spans in spans]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layers = [cache.layers[layer_idx] for cache in self._caches]
        if not self._append(layers, key_states, value_states):
            for row, layer in enumerate(layers):
                layer.update(key_states[row : row + 1], value_states[row : row + 1])
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        key_name, value_name = f"{layer_idx}.keys", f"{layer_idx}.values"
        shared_keys, shared_values, shared_at = [], [], []
        for row, chunks in enumerate(self._shared):
            for chunk, first, tensors in chunks:
                entry_keys = tensors[key_name]
                if entry_keys.dtype != keys[row].dtype:  # not the bytes the row holds
                    continue
                shared_keys.append(entry_keys)
                shared_values.append(tensors[value_name])
                shared_at.extend((row, chunk, first))
        at = tuple(shared_at)
        return RaggedKv(tuple(keys), tuple(shared_keys), at), RaggedKv(tuple(values), tuple(shared_values), at)

    @staticmethod
    def _append(layers: list, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Write each row's K/V into its layer with the built kernel, in one call; False where it does not apply."""
        if _append_rows is None or key_states.device.type != "cpu":
            return False
        if key_states.stride(-1) != 1 or value_states.stride(-1) != 1:
            return False
        slots = [layer.next_slot() for layer in layers]
        if any(slot is None or slot[0].dtype != key_states.dtype for slot in slots):
            return False
        _append_rows(key_states, value_states, [slot[0] for slot in slots], [slot[1] for slot in slots],
                     [slot[2] for slot in slots])  # fmt: skip
        for layer in layers:
            layer.advance(1)
        return True


def batches_decode(layout: ModelLayout) -> bool:
    """Whether this model's decode steps can share a pass (every layer full attention in a `GrowingLayer`)."""
    return layout.only_full_attention


def _positions(caches: Sequence[object], device: torch.device) -> torch.Tensor:
    return torch.tensor([[cache.layers[0].length] for cache in caches], dtype=torch.long, device=device)


@torch.inference_mode()
def decode_rows(model: torch.nn.Module, tokens: Sequence[int], caches: Sequence[object],
                spans: Sequence[Sequence[RestoredSpan]] | None = None) -> torch.Tensor:  # fmt: skip
    """Feed token i to cache i (every cache of a `batches_decode` model), return next-token logits [B, vocab].

    `spans[i]`: where cache i's restored K/V were copied from (`Restored.spans`; None: nowhere known)."""
    device = model.device
    input_ids = torch.tensor([[token] for token in tokens], dtype=torch.long, device=device)
    if len(caches) == 1:  # one request: the very pass a request alone runs
        return model(input_ids=input_ids, **cache_argument(model, caches[0]), use_cache=True).logits[:, -1]
    # No mask: each row's attention sees all of its own keys, which is exactly its causal mask.
    layers = _BatchLayers(caches, spans if spans and device.type == "cpu" else [()] * len(caches))
    output = model(input_ids=input_ids, position_ids=_positions(caches, device), attention_mask=no_masks(model),
                   **cache_argument(model, layers), use_cache=True)  # fmt: skip
    return output.logits[:, -1]


# The batch of the load-time check (the largest exact mode runs): rows of different lengths.
CHECK_ROWS = EXACT_DECODE_MAX_ROWS


@torch.inference_mode()
def rows_compute_alike(model: torch.nn.Module, vocab: int) -> bool:
    """Whether a decode pass of several rows computes each row's logits and K/V bit for bit as that row alone.

    Prefills CHECK_ROWS short prompts of different lengths, then compares one batched step against the
    steps alone. It tests this machine's kernels at this model's shapes, at the largest batch exact mode
    runs (EXACT_DECODE_MAX_ROWS): every row of a smaller batch takes the same few-rows kernels.
    """
    generator = torch.Generator().manual_seed(20261207)
    lengths = [5 + 3 * row for row in range(CHECK_ROWS)]
    prompts = [torch.randint(0, vocab, (length,), generator=generator).to(model.device) for length in lengths]
    steps = torch.randint(0, vocab, (CHECK_ROWS,), generator=generator).tolist()

    def prefilled() -> list[object]:
        caches = []
        for prompt in prompts:
            cache = new_cache(model.config, prompt.shape[0] + 2, None)
            model(input_ids=prompt.unsqueeze(0), **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
            caches.append(cache)
        return caches

    alone_caches, batch_caches = prefilled(), prefilled()
    alone = torch.cat([decode_rows(model, [token], [cache]) for token, cache in zip(steps, alone_caches)])
    batched = decode_rows(model, steps, batch_caches)
    if not torch.equal(alone, batched):
        return False
    for first, second in zip(alone_caches, batch_caches):
        for a, b in zip(first.layers, second.layers):
            if isinstance(a, GrowingLayer) and not (torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)):
                return False
    return True
