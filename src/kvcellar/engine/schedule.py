"""Which prefill schedule an engine runs, decided once when it loads (engine/prefill.py states both).

Operations: `choose_schedule(model, config, layout, device_type) -> (schedule, chunk_size)`.

"auto" takes the row-invariant schedule where it applies: a CPU, an exact-mode
cache or none at all (an engine without a cache is the reference an exact one
is held to, so both run the same schedule; near mode needs no schedule to
match and its chunks are free already), and only full-attention layers (a sliding window or
a recurrent state cannot hand over a block that ended inside a pass); and
where this machine passes the check of engine/invariance.py. Otherwise the
fixed schedule, as before. Asked for explicitly ("row-invariant") where it
cannot run, the engine says why in one warning and runs the fixed one.
"""

from __future__ import annotations

import logging
import time

import torch

from kvcellar.config import PREFILL_CHUNK_SIZE, ROW_INVARIANT_MIN_ROWS, EngineConfig
from kvcellar.engine.attention import use_query_pieces
from kvcellar.engine.invariance import check_row_invariance
from kvcellar.engine.prefill import chunk_size_for
from kvcellar.kv.layout import ModelLayout

log = logging.getLogger(__name__)


def _why_not(layout: ModelLayout, device_type: str, near: bool) -> str | None:
    if device_type != "cpu":
        return f"it runs on CPUs only (this engine runs on {device_type})"
    if near:
        return "it serves exact mode (the cache is in near mode, where chunks are free already)"
    if not layout.only_full_attention:
        return f"it needs every layer to be full attention ({layout.describe() if layout.is_cacheable else 'uncacheable'})"
    return None


def choose_schedule(model: torch.nn.Module, config: EngineConfig, layout: ModelLayout, device_type: str) -> tuple[str, int]:
    """The schedule ("fixed" or "row-invariant") and its prefill chunk, in tokens (a multiple of the block)."""
    block = config.block_size
    exact = config.cache.enabled and config.cache.exact
    fixed = ("fixed", chunk_size_for(config.prefill_chunk_size, block, layout, device_type, exact))
    use_query_pieces(model, None)
    if config.prefill_schedule == "fixed":
        return fixed
    reason = _why_not(layout, device_type, near=config.cache.enabled and not config.cache.exact)
    chunk = config.prefill_chunk_size or -(-PREFILL_CHUNK_SIZE["cpu"] // block) * block
    if reason is None:
        started = time.perf_counter()
        check = check_row_invariance(model, block, chunk, ROW_INVARIANT_MIN_ROWS)
        log.debug("row-invariance check: %s in %.2f s", "holds" if check.holds else check.detail, time.perf_counter() - started)
        if check.holds:
            use_query_pieces(model, block)
            return "row-invariant", chunk
        use_query_pieces(model, None)
        reason = f"this machine's kernels round rows differently by pass length ({check.detail})"
    if config.prefill_schedule == "row-invariant":
        log.warning("row-invariant prefill not used: %s; prefilling on the fixed schedule", reason)
    elif reason.startswith("this machine"):
        log.info("row-invariant prefill not used: %s; prefilling on the fixed schedule", reason)
    return fixed
