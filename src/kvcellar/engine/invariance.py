"""Whether this machine computes a model's tokens the same in any prefill pass: the premise of the
row-invariant prefill schedule (engine/prefill.py), checked once when the engine loads.

Operations: `check_row_invariance(model, block_size, chunk_size, min_rows) -> RowCheck`,
`thread_counts_alike(model, counts, min_rows) -> list[int]`.

The check prefills fixed random ids in one pass, then again in passes that start
after a prefix computed alone (at one and at two blocks, the second leaving
`min_rows` + 3 tokens), through the first `CHECK_LAYERS` decoder layers only
(what it tests is the math library's kernels, not depth), and compares every
K/V row and the last token's logits bit for bit. Where they differ (another
BLAS, another thread count, another device) the engine keeps the block schedule,
which is exact by construction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvcellar.engine.attention import use_query_pieces
from kvcellar.engine.prefill import cache_argument, invariant_chunk_ends
from kvcellar.kv.growing_layer import new_cache

CHECK_LAYERS = 2  # enough for attention to read K/V that earlier passes computed
CHECK_PROMPT_TOKENS = 256  # the thread-count check's prompt
_SEED = 20261203


@dataclass(frozen=True)
class RowCheck:
    holds: bool
    detail: str  # what differed, for the log line ("" when it holds)


@contextlib.contextmanager
def _first_layers(model: torch.nn.Module, count: int) -> Iterator[None]:
    """Run only the first `count` decoder layers (transformers' models loop over `config.num_hidden_layers`)."""
    config = model.config
    saved = config.num_hidden_layers
    config.num_hidden_layers = min(count, saved)
    try:
        yield
    finally:
        config.num_hidden_layers = saved


def _run(model: torch.nn.Module, ids: torch.Tensor, starts: tuple[int, ...], chunk_size: int, min_rows: int):
    """Prefill `ids` in passes that begin at each of `starts` (then on the runtime schedule); K/V and logits."""
    cache = new_cache(model.config, ids.shape[0], None)
    logits = None
    bounds = [*starts, ids.shape[0]]
    for start, stop in zip(bounds, bounds[1:]):
        position = start
        for end in invariant_chunk_ends(start, stop, chunk_size, min_rows):
            output = model(input_ids=ids[position:end].unsqueeze(0), **cache_argument(model, cache), use_cache=True,
                           logits_to_keep=1)  # fmt: skip
            logits = output.logits[0, -1]
            position = end
    layers = [layer for layer in cache.layers[: model.config.num_hidden_layers] if getattr(layer, "keys", None) is not None]
    return [(layer.keys.clone(), layer.values.clone()) for layer in layers], logits


@torch.inference_mode()
def check_row_invariance(model: torch.nn.Module, block_size: int, chunk_size: int, min_rows: int) -> RowCheck:
    """Compare one pass against passes after restored prefixes, with query pieces of `block_size`."""
    vocab = model.get_input_embeddings().num_embeddings
    length = 2 * block_size + min_rows + 3
    generator = torch.Generator().manual_seed(_SEED)
    ids = torch.randint(0, vocab, (length,), generator=generator).to(model.device)
    use_query_pieces(model, block_size)
    with _first_layers(model, CHECK_LAYERS):
        reference_kv, reference_logits = _run(model, ids, (0,), chunk_size, min_rows)
        for restored_at in (block_size, 2 * block_size):
            kv, logits = _run(model, ids, (0, restored_at), chunk_size, min_rows)
            for index, ((keys, values), (ref_keys, ref_values)) in enumerate(zip(kv, reference_kv)):
                if not (torch.equal(keys, ref_keys) and torch.equal(values, ref_values)):
                    return RowCheck(False, f"layer {index}'s K/V differ after a prefix of {restored_at} tokens")
            if not torch.equal(logits, reference_logits):
                return RowCheck(False, f"the last logits differ after a prefix of {restored_at} tokens")
    return RowCheck(True, "")


@torch.inference_mode()
def thread_counts_alike(model: torch.nn.Module, counts: list[int], min_rows: int) -> list[int]:
    """The thread counts among `counts` whose prefill pass and decode step match, bit for bit, those of the
    current count (always included): what engine/threads.py may switch between."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(_SEED + 1)
    # A prompt long enough for the matrix kernels' blocked paths, then one decode step (the one-row paths).
    ids = torch.randint(0, vocab, (max(CHECK_PROMPT_TOKENS, 3 * min_rows) + 1,), generator=generator).to(model.device)
    current = torch.get_num_threads()

    def run() -> list[torch.Tensor]:
        cache = new_cache(model.config, ids.shape[0], None)
        prompt = model(input_ids=ids[:-1].unsqueeze(0), **cache_argument(model, cache), use_cache=True, logits_to_keep=1)
        step = model(input_ids=ids[-1:].unsqueeze(0), **cache_argument(model, cache), use_cache=True)
        states = [tensor.clone() for layer in cache.layers[: model.config.num_hidden_layers]
                  for name, tensor in vars(layer).items() if isinstance(tensor, torch.Tensor) and not name.startswith("_")]
        return [prompt.logits, step.logits, *states]  # every layer kind's state (K/V, conv and recurrent states)

    alike = [current]
    try:
        with _first_layers(model, CHECK_LAYERS):
            reference = run()
            for count in sorted(set(counts) - {current}):
                torch.set_num_threads(count)
                if all(torch.equal(a, b) for a, b in zip(run(), reference, strict=True)):
                    alike.append(count)
    finally:
        torch.set_num_threads(current)
    return sorted(alike)
