"""Chunked-prefill attention without a materialized mask (used on CUDA and CPU).

A prefill chunk of q tokens on top of p cached ones attends causally with the
diagonal aligned to the bottom right: query i sees keys [0, p + i]. transformers'
`sdpa` attention builds that as a dense [q, p + q] boolean mask, and with a
mask CUDA's SDPA can neither skip the masked tiles nor use its flash kernel
for grouped K/V heads (it copies K/V out to every query head first), so a
chunked prefill ran far slower than one unchunked pass (docs/benchmarks.md).

So this registers `kvcellar_sdpa`, transformers' sdpa with one change: for a
plain causal mask (no padding, no sliding window, no custom overlay) with a
cached prefix, the mask function returns torch's `causal_lower_right` bias
instead of a tensor, and the attention function hands it to SDPA, which runs
the flash kernel with bottom-right causality (on CPU, where SDPA would
materialize that mask, it runs two unmasked flash passes instead once 1K keys are cached:
`_split_causal_cpu`). A decode step on CPU (one query row, no mask, fp32 or
bf16) runs `_decode_cpu`: the built kernel of engine/kernels where the loader
has it, else two batched products per K/V head group; both read each key and
value once (SDPA's CPU kernel for one bf16 row reads them several times
slower). A bf16 CPU prefill pass of plain causal attention runs the built
causal kernel where the CPU has bf16 dot products (about twice torch's flash
rate; row-invariant, so query pieces below are not needed with it). Every
other case (sliding windows, padding, other dtypes) goes through
transformers' own code unchanged. Cold
and cached prefills take the same path, so exact mode stays bit-identical;
decode steps after a restore and after a cold prefill take the same path too.

Query pieces (`use_query_pieces`, CPU, set by the engine for the row-invariant
prefill schedule, engine/prefill.py): a prefill's queries are cut at absolute
multiples of the piece (the cache block), and each piece [a, e) attends to
keys [0, a) unmasked and to [a, e) causally, two flash passes merged as above.
A piece is then computed the same way whichever forward pass it falls in, one
pass over the whole prompt or a pass after a restored prefix: torch's CPU flash
kernel tiles the queries of each call from the call's first row, with tile
sizes chosen from the call's length, and rows rounded differently in
differently sized tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from kvcellar.engine.kernels import CausalAttention, CpuKernels, OneRowAttention, RaggedOneRowAttention

NAME = "kvcellar_sdpa"


def _mask(**kwargs: object) -> object:
    """transformers' sdpa mask, or a lower-right causal bias where that is exactly the same mask."""
    q_length = kwargs.get("q_length")
    if q_length is None and "cache_position" in kwargs:  # transformers before q_length/q_offset
        q_length = kwargs["cache_position"].shape[0]
        q_end = kwargs.get("kv_offset", 0) + kwargs["kv_length"]  # a full cache: queries end where keys end
    else:
        q_end = kwargs.get("q_offset", 0) + (q_length or 0)
    kv_length, kv_end = kwargs["kv_length"], kwargs.get("kv_offset", 0) + kwargs["kv_length"]
    plain_causal = (
        kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("attention_mask") is None
        and kwargs.get("local_size") is None
    )
    if plain_causal and q_length is not None and 1 < q_length < kv_length and q_end == kv_end:
        return causal_lower_right(q_length, kv_length)
    return sdpa_mask(**kwargs)


# CUDA: SDPA's cuDNN kernel builds an execution graph on the CPU for every new shape, and a decode step's
# key count is new at every step; from this many query rows on, a pass is long enough that cuDNN's faster
# kernel pays for that build. Shorter calls (decode steps) take flash or memory-efficient attention.
CUDNN_FROM_ROWS = 1024
_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Below this many cached keys one masked pass is as fast as the split (a CPU measurement, 256 queries).
SPLIT_FROM_CACHED_KEYS = 1024


def _split_causal_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Bottom-right causal attention as two unmasked flash passes, merged by their log-sum-exps.

    The chunk's queries see all cached keys (no mask) and their own keys causally (a square: plain
    is_causal). torch's CPU flash kernel runs both without a mask tensor and takes grouped K/V heads as
    they are. Merged with one `lerp` (the weight of the second part is sigmoid(lse2 - lse1)). Faster
    than one masked pass from SPLIT_FROM_CACHED_KEYS cached keys on, the more so the more keys.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    past = key.shape[2] - query.shape[2]
    seen, seen_lse = flash(query, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scale)
    own, own_lse = flash(query, key[:, :, past:], value[:, :, past:], 0.0, True, scale=scale)
    return torch.lerp(seen, own, torch.sigmoid(own_lse - seen_lse).unsqueeze(-1).to(seen.dtype))


def _query_pieces_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                      piece: int) -> torch.Tensor:  # fmt: skip
    """Causal attention of the last q of kv positions, in query pieces cut at absolute multiples of `piece`.

    query [B, H, q, D], key/value [B, H_kv, kv, D] (the cached prefix, then the chunk's own).
    """
    num_keys = key.shape[2]
    offset = num_keys - query.shape[2]
    outputs = []
    start = offset
    while start < num_keys:
        end = min((start // piece + 1) * piece, num_keys)
        rows = query[:, :, start - offset : end - offset]
        if start > 0:  # the piece's rows see keys [0, start) and, causally, their own
            outputs.append(_split_causal_cpu(rows, key[:, :, :end], value[:, :, :end], scale))
        else:
            outputs.append(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                rows, key[:, :, :end], value[:, :, :end], 0.0, True, scale=scale)[0])  # fmt: skip
        start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


# The built CPU kernels (engine/kernels), set by the loader where they build; None: torch's kernels.
_one_row_kernel: OneRowAttention | None = None
_ragged_kernel: RaggedOneRowAttention | None = None
_causal_kernel: CausalAttention | None = None
_ragged_chunk_keys = 0


def use_cpu_kernels(kernels: CpuKernels) -> None:
    """Run CPU attention through the built `kernels` where they apply (CpuKernels(): torch's). Process-wide."""
    global _one_row_kernel, _ragged_kernel, _causal_kernel, _ragged_chunk_keys
    _one_row_kernel, _ragged_kernel = kernels.one_row_attention, kernels.ragged_one_row_attention
    _causal_kernel = kernels.causal_attention
    _ragged_chunk_keys = kernels.ragged_chunk_keys if _ragged_kernel is not None else 0


def shared_chunk_keys() -> int:
    """The keys of one chunk a batched decode step's rows may read from shared memory (`RaggedKv.shared`);
    0 where no kernel reads them (torch's paths read each row's own K/V)."""
    return _ragged_chunk_keys


def _one_row_cpu(query: torch.Tensor, attention_mask: object, dropout: float, kwargs: dict) -> bool:
    """Whether a call is a CPU decode step's plain one-row attention (`_decode_cpu`)."""
    return (query.shape[2] == 1 and attention_mask is None and query.dtype in (torch.float32, torch.bfloat16)
            and query.device.type == "cpu" and dropout == 0.0 and not _extra_terms(kwargs))  # fmt: skip


def _kernel_reads(key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the built one-row kernels read these K/V (rows contiguous)."""
    return key.stride(-1) == 1 and value.stride(-1) == 1


def _ragged_kernel_fits(query: torch.Tensor, key: RaggedKv, value: RaggedKv, dropout: float, kwargs: dict) -> bool:
    """Whether every row would take the built one-row kernel alone (`_attention`'s one-row CPU case)."""
    if _ragged_kernel is None or _graph_mask is not None or not _one_row_cpu(query, None, dropout, kwargs):
        return False
    return all(k.dtype == key.rows[0].dtype and k.shape[0] == 1 and _kernel_reads(k, v)
               for k, v in zip(key.rows, value.rows))  # fmt: skip


def _kernel_rows(query: torch.Tensor, attend) -> torch.Tensor:
    """A built one-row kernel's call on a [B, H, 1, D] query: `attend` takes the rows, unscaled in the query's
    dtype, as [B, H, D] and returns [B, H, D] fp32; -> [B, H, 1, D] in the query's dtype."""
    batch, heads, _, dim = query.shape
    return attend(query.reshape(batch, heads, dim).contiguous()).to(query.dtype).view(batch, heads, 1, dim)


def _causal_kernel_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object,
                        dropout: float, kwargs: dict) -> bool:  # fmt: skip
    """Whether `_causal_kernel` computes this call: a bf16 CPU pass of plain causal attention (bottom right)."""
    if _causal_kernel is None or query.device.type != "cpu" or dropout != 0.0 or _extra_terms(kwargs):
        return False
    if not (query.dtype == key.dtype == value.dtype == torch.bfloat16) or query.shape[-1] % 32 != 0:
        return False
    rows, keys = query.shape[2], key.shape[2]
    if attention_mask is None:  # transformers leaves the mask out for a full square pass (is_causal)
        return rows == keys
    return isinstance(attention_mask, CausalBias) and attention_mask.seq_len_q == rows and attention_mask.seq_len_kv == keys


def _grouped_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A one-row query [B, H, 1, D] as [B, H_kv, G, D]: the G query heads that read each K/V head, as rows."""
    batch, heads, _, dim = query.shape
    return query.reshape(batch, kv_heads, heads // kv_heads, dim)


def _decode_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """One query row per head against all keys, each K/V head's group of query heads together.

    query [B, H, 1, D], key/value [B, H_kv, kv, D] -> [B, H, 1, D]. A decode step is bound by reading
    the K/V. The built kernel reads every key and value once, widened to fp32, with an fp32 softmax.
    Without it, two batched products per group stream every key and value once too, where SDPA's CPU
    kernel for one query row reads them at a fraction of the memory bandwidth.
    """
    batch, heads, _, dim = query.shape
    scale = dim**-0.5 if scale is None else scale
    if _one_row_kernel is not None and _kernel_reads(key, value):
        return _kernel_rows(query, lambda rows: _one_row_kernel(rows, key, value, key.shape[2], scale))
    grouped = _grouped_rows(query, key.shape[1])
    scores = torch.matmul(key, grouped.transpose(-1, -2))  # [B, H_kv, kv, G]
    # bf16: scores rounded to bf16, softmax in fp32, as transformers' eager attention does.
    probs = torch.softmax(scores.mul_(scale), dim=2, dtype=torch.float32)
    return torch.matmul(probs.to(value.dtype).transpose(-1, -2), value).reshape(batch, heads, 1, dim)


def use_query_pieces(model: torch.nn.Module, piece: int | None) -> None:
    """Cut prefill queries at absolute multiples of `piece` (None: one SDPA call per pass, as before)."""
    model.config.kvcellar_query_piece = piece


# Set while a CUDA decode graph is captured (engine/graph_decode.py): [1, 1, 1, keys] bool, True for the keys
# the step sees; the cache layers return `keys` keys, the ones past the step's position stale.
_graph_mask: torch.Tensor | None = None


def use_graph_mask(mask: torch.Tensor | None) -> None:
    """Mask every one-row attention call with `mask` (None: stop); for the capture of a decode graph only."""
    global _graph_mask
    _graph_mask = mask


def _graph_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    """A captured decode step's attention: each K/V head's group of query rows against its keys, under the
    graph's mask, so SDPA needs no grouped-head support (its masked kernels have none). -> [B, 1, H, D]."""
    batch, heads, _, dim = query.shape
    rows = _grouped_rows(query, key.shape[1])
    output = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=_graph_mask, scale=scale)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class RaggedKv:
    """The keys (or values) of a batched decode step's rows (engine/batch_decode.py): one [1, H_kv, n_i, D]
    view per row, each of its own request's length.

    `shared[i]` holds, from key `shared_at[3i + 2]` on, the same bytes as the keys of chunk `shared_at[3i + 1]`
    (`shared_chunk_keys()` keys) of row `shared_at[3i]`: the cache block the row was restored from. The
    kernel reads it there, so rows restored from one block read it from memory once (the same bits).
    """

    rows: tuple[torch.Tensor, ...]
    shared: tuple[torch.Tensor, ...] = ()
    shared_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class PassKv:
    """The keys (or values) of a pass that prefills several prompts at once (engine/batch_prefill.py): each
    prompt's [1, H_kv, k_i, D] cache view, and how many of the pass's queries (in order) are its new tokens."""

    rows: tuple[torch.Tensor, ...]
    queries: tuple[int, ...]


def _per_prompt(module, query, key: PassKv, value: PassKv, dropout, scaling, kwargs) -> torch.Tensor:
    """Each prompt's queries against its own keys, causal from its cached prefix, through the very call its pass
    alone makes (the mask transformers would build: none for a pass without a prefix, else bottom-right)."""
    outputs = []
    for part, keys, values in zip(query.split(key.queries, dim=2), key.rows, value.rows, strict=True):
        rows, num_keys = part.shape[2], keys.shape[2]
        mask = None if rows == num_keys else causal_lower_right(rows, num_keys)
        outputs.append(_attention(module, part, keys, values, mask, dropout, scaling, **kwargs)[0])
    return torch.cat(outputs, dim=1)


def _ragged(module, query, key: RaggedKv, value: RaggedKv, dropout, scaling, kwargs) -> torch.Tensor:
    """Each row of a batched decode step exactly as a one-request step computes it (no mask: a row sees its keys):
    on a CPU with the built kernels one call for every row, else the one-request path row by row."""
    if _ragged_kernel_fits(query, key, value, dropout, kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        lengths = [keys.shape[2] for keys in key.rows]
        output = _kernel_rows(query, lambda rows: _ragged_kernel(
            rows, list(key.rows), list(value.rows), lengths, list(key.shared), list(value.shared), list(key.shared_at),
            scale))
        return output.transpose(1, 2).contiguous()
    outputs = [_attention(module, query[row : row + 1], keys, values, None, dropout, scaling, **kwargs)[0]
               for row, (keys, values) in enumerate(zip(key.rows, value.rows, strict=True))]  # fmt: skip
    return torch.cat(outputs)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if isinstance(key, RaggedKv):
        return _ragged(module, query, key, value, dropout, scaling, kwargs), None
    if isinstance(key, PassKv):
        return _per_prompt(module, query, key, value, dropout, scaling, kwargs), None
    if _graph_mask is not None and query.shape[2] == 1:
        return _graph_decode(query, key, value, scaling), None
    if query.shape[2] > 1 and _causal_kernel_fits(query, key, value, attention_mask, dropout, kwargs):
        # Row-invariant by construction (engine/kernels): query pieces would compute the same bits.
        return _causal_kernel(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None
    piece = getattr(module.config, "kvcellar_query_piece", None)
    plain_causal = attention_mask is None or isinstance(attention_mask, CausalBias)
    if piece and plain_causal and query.shape[2] > 1 and query.device.type == "cpu" and dropout == 0.0:
        return _query_pieces_cpu(query, key, value, scaling, piece).transpose(1, 2).contiguous(), None
    if _one_row_cpu(query, attention_mask, dropout, kwargs):
        return _decode_cpu(query, key, value, scaling).transpose(1, 2).contiguous(), None
    if not isinstance(attention_mask, CausalBias):
        if query.device.type == "cuda" and query.shape[2] < CUDNN_FROM_ROWS:
            with sdpa_kernel(_NOT_CUDNN):
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                              **kwargs)  # fmt: skip
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.device.type == "cpu" and dropout == 0.0 and key.shape[2] - query.shape[2] >= SPLIT_FROM_CACHED_KEYS:
        output = _split_causal_cpu(query, key, value, scaling)
    else:
        groups = getattr(module, "num_key_value_groups", 1)
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
        )
    return output.transpose(1, 2).contiguous(), None


def _extra_terms(kwargs: dict) -> bool:
    """Whether a model adds to plain softmax attention (logit soft-capping, attention sinks)."""
    return kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None


def register() -> str:
    """Make `kvcellar_sdpa` known to transformers (idempotent); returns its name for `attn_implementation`."""
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
