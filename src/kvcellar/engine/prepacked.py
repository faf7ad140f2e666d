"""Weights prepacked for oneDNN: a bf16 CPU model's passes of several rows.

torch's bf16 `linear` on a CPU hands the weight to oneDNN at every call, and
oneDNN first reorders it into its blocked layout. For a pass of a few rows (a
64-token turn, a prompt tail, a short chat message) that reorder costs about
as much as the product itself (docs/benchmarks.md has the rates). So each
`Bf16Linear` keeps a packed copy (`torch.ops.mkldnn._reorder_linear_weight`)
for passes of two rows or more; the product is the same oneDNN kernel, and the
load checks on every weight shape that it is bit for bit `linear`'s at several
row counts. One-row passes keep the plain weight, which the one-row kernel reads.

The packed copy doubles the linear weights' memory: it is made only while the
copy fits `PREPACK_MAX_RAM_FRACTION` of the machine's memory (a 0.6B model on
24 GiB, not an 8B one), else one log line says why not.

Operations: `prepack_linears(model) -> int` (how many layers were packed).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

# The packed copies may take at most this share of the machine's memory.
PREPACK_MAX_RAM_FRACTION = 0.25
_PACK_FOR_ROWS = 1024  # oneDNN's blocking hint; the product is the same for any row count (checked)
_CHECK_ROWS = (2, 16, 64, 300)


def prepack_linears(model: nn.Module) -> int:
    """Give `model`'s `Bf16Linear` layers a packed weight where that fits and computes alike; returns how many."""
    from kvcellar.engine.weights import Bf16Linear  # (weights.py imports this module)

    linears = [module for module in model.modules() if isinstance(module, Bf16Linear)]
    if not linears or not _available():
        return 0
    if not copy_fits(sum(module.weight.numel() * module.weight.element_size() for module in linears), "oneDNN's packed copy"):
        return 0
    packed = {}
    for module in linears:
        module.packed = packed.get(id(module.weight))
        if module.packed is None:
            module.packed = packed[id(module.weight)] = _pack(module.weight)
    shapes = {tuple(module.weight.shape): module for module in linears}
    mismatch = next((shape for shape, module in shapes.items() if not _computes_alike(module)), None)
    if mismatch is not None:
        log.warning("prepacked weights compute differently from torch's linear on a %s weight: left unpacked", mismatch)
        for module in linears:
            module.packed = None
        return 0
    return len(linears)


def copy_fits(extra: int, what: str) -> bool:
    """Whether a copy of `extra` bytes of weights fits `PREPACK_MAX_RAM_FRACTION` of the machine's memory; one
    log line says so where it does not."""
    if extra > PREPACK_MAX_RAM_FRACTION * machine_memory():
        log.info("linear weights stay unpacked: %s (%.1f GB) would exceed %.0f%% of this machine's memory",
                 what, extra / 1e9, 100 * PREPACK_MAX_RAM_FRACTION)  # fmt: skip
        return False
    return True


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_FOR_ROWS)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear(x, weight, bias)` for x [..., in] with the weight's packed copy."""
    rows = x.reshape(-1, x.shape[-1])
    output = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return output.view(*x.shape[:-1], output.shape[-1])


def _computes_alike(module: nn.Module) -> bool:
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in _CHECK_ROWS:
            x = torch.randn(rows, module.in_features, generator=generator).to(module.weight.dtype)
            expected = torch.nn.functional.linear(x, module.weight, module.bias)
            if not torch.equal(packed_product(x, module.packed, module.bias), expected):
                return False
    return True


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def machine_memory() -> int:
    """The machine's physical memory in bytes (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume it does not fit
        return 0
