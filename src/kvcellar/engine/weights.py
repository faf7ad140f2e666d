"""fp32 compute with weights stored in bf16 (the `float32-bf16-weights` dtype), and
the one-row kernel that a decode step of it, or of a bf16 model on a CPU, runs.

On a CPU without bf16 instructions (AVX2), fp32 is the fast compute dtype:
torch emulates bf16 arithmetic, and a bf16 prefill runs several times slower
(docs/benchmarks.md). But a decode step multiplies every weight by one row of
activations, so it is bound by memory bandwidth, and fp32 weights are twice
the bytes a bf16 checkpoint holds. So each weight that bf16 holds exactly
(every weight of a bf16 checkpoint; checked value by value, never assumed)
is stored once, in bf16, and a linear layer:

- upcasts it to fp32 for a pass of at least `FP32_WEIGHTS_FROM_ROWS` rows (a
  prefill): the same values and the same fp32 kernel as an fp32 model, so the
  prefill's K/V and hidden states are bit-identical to it (the upcast costs
  one read of the weight per pass, small next to the pass's arithmetic);
- for one row (a decode step) runs a kernel that AOTInductor (torch.export
  and inductor, ahead of time) builds from `_OneRowProduct`: each bf16
  weight is read once and widened in registers, the sum is fp32 and so are the activations, half the
  bytes of an fp32 weight read. Eager torch has no such mixed kernel: a bf16
  `linear` would round the activations and the output to bf16 and, with
  bf16 arithmetic emulated, runs slower. If building it fails (no C++
  compiler), one warning, and one-row passes take the path below;
- multiplies it in bf16 for 2 to `FP32_WEIGHTS_FROM_ROWS` - 1 rows (a short
  prompt tail): the activations rounded to bf16, the output upcast back.

Exact mode keeps its promise: a request with the cache and without it run
the same passes through the same code. The weights take half the memory. A
tied embedding shares the bf16 copy when it is a plain `nn.Embedding` (its
lookup is exact and is upcast on the way out); any other owner (a scaled
embedding) keeps the weight in fp32 for all of them.

A bf16 model on a CPU (`use_one_row_kernel`, `Bf16Linear`) keeps its
weights and its bf16 products for passes of several rows; only a one-row pass
runs the same kernel (the row widened to fp32 exactly, the output rounded to
bf16 once), since torch's bf16 product for one row reads the weight at about
half the rate. In both, the linear layers that read one input (`SIBLINGS`)
store their weights as row ranges of one tensor, multiplied in one call.

Operations: `store_weights_in_bf16(model, kernel_dir) -> StoredWeights`,
`use_one_row_kernel(model, kernel_dir) -> int`.
The kernel (sizes symbolic: one for every weight shape) is built once per
torch version into `kernel_dir` (the loader passes `$KVCELLAR_HOME/kernels`)
and loaded from there after, then checked on each weight shape while the
model loads, so no request pays for it. Built ahead of time rather than
through `torch.compile`: a compiled function's Python wrapper costs more per
call than the product of a small weight, and a restart would trace it again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from kvcellar.config import FP32_WEIGHTS_FROM_ROWS
from kvcellar.engine.kernels import CpuKernels, load_cpu_kernels
from kvcellar.engine.prepacked import copy_fits, packed_product, prepack_linears

log = logging.getLogger(__name__)

OneRowProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _OneRowProduct(nn.Module):
    def forward(self, row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """row [1, in] fp32, weight [out, in] bf16 -> [1, out] fp32: written for inductor to fuse into one pass."""
        return (weight.float() * row).sum(-1).unsqueeze(0)


# Linear layers of one parent that read the same input (attention's projections, a gated MLP's two
# halves): their bf16 weights are stored as row ranges of one tensor, and a one-row pass multiplies them
# all in one kernel call, fewer calls and longer runs of weight rows, which read closer to the memory
# bandwidth than three short products.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SiblingRows:
    """One product for a group of sibling linears: the first member computes it, the others slice it
    while they are called with the very same input tensor (else each computes its own)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [sum of outputs, in] bf16; each member's weight is a row range of it
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def product(self, kernel: OneRowProduct, member: Bf16StoredLinear, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if member.sibling_rows[0] == 0:
            self._input, self._output = x, kernel(rows, self.weight)
        elif x is not self._input:
            return kernel(rows, member.weight)
        start, end = member.sibling_rows
        return self._output[:, start:end]


class Bf16StoredLinear(nn.Linear):
    """An `nn.Linear` whose weight is stored in bf16 and whose inputs and outputs are fp32 (see the module doc)."""

    one_row: OneRowProduct | None = None  # the built kernel, shared by every layer; None: bf16 linear
    few_rows = 1  # the most rows one call of `one_row` takes (the kernel of engine/kernels: a decode batch)
    siblings: _SiblingRows | None = None  # set: the weight is rows `sibling_rows` of the group's tensor
    sibling_rows: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= FP32_WEIGHTS_FROM_ROWS:
            return functional.linear(x, self.weight.float(), self.bias)
        if rows <= self.few_rows and self.one_row is not None:
            output = self._product(x, x.reshape(rows, self.in_features).contiguous())
            output = output.view(*x.shape[:-1], self.out_features)
        else:
            output = functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return output if self.bias is None else output + self.bias

    def _product(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The kernel's [R, out] fp32 product of `rows` (x as R rows), shared with siblings where joined."""
        if self.siblings is not None:
            return self.siblings.product(self.one_row, self, x, rows)
        return self.one_row(rows, self.weight)


class Bf16Linear(Bf16StoredLinear):
    """A bf16 model's linear layer on a CPU. A few rows (decode steps, alone or batched) run a built kernel:
    with the kernels of engine/kernels the bf16 rows as they are, through the CPU's bf16 dot product, on a
    copy of the weight packed for it, each row the same bits in any batch (so exact mode batches decode
    steps); else the AOTInductor one-row kernel, one row widened to fp32, which is exact. Sums are fp32 and
    the output is rounded to bf16 once, as a bf16 linear rounds it. More rows (prefill passes): the weight
    prepacked for oneDNN (engine/prepacked.py), else a plain bf16 linear."""

    packed: torch.Tensor | None = None  # set: the weight prepacked for oneDNN (engine/prepacked.py)
    fp32_rows = True  # whether `one_row` takes fp32 rows (the AOTInductor kernel) rather than bf16 ones
    # The LM head keeps the kernel's fp32 sums: logits rounded to bf16 (steps of 0.125 near 20) tie where the
    # model's own values do not, and greedy decoding would then pick by token id.
    fp32_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.one_row is not None and 0 < rows <= self.few_rows:
            flat = x.reshape(rows, self.in_features)
            output = self._product(x, flat.float() if self.fp32_rows else flat.contiguous())
            if self.bias is not None:
                output = output + self.bias.float()
            output = output if self.fp32_output else output.to(x.dtype)
            return output.view(*x.shape[:-1], self.out_features)
        if self.packed is not None:
            return packed_product(x, self.packed, self.bias)
        return functional.linear(x, self.weight, self.bias)


class _PackedRows:
    """The built few-rows kernel on weights packed for it (one copy each, made at load: the joined sibling
    weights and the linears that have no siblings); a weight with no packed copy takes the unpacked kernel."""

    def __init__(self, kernels: CpuKernels, weights: list[torch.Tensor]) -> None:
        self._product, self._plain = kernels.packed_rows_product, kernels.bf16_rows_product
        self._packs = {_identity(w): (kernels.pack_rows_weight(w), w.shape[0]) for w in weights if w.shape[1] % 2 == 0}

    @property
    def num_bytes(self) -> int:
        return sum(packed.numel() * packed.element_size() for packed, _ in self._packs.values())

    def __call__(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        found = self._packs.get(_identity(weight))
        return self._plain(rows, weight) if found is None else self._product(rows, *found)


def _identity(weight: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return weight.data_ptr(), tuple(weight.shape)


def use_one_row_kernel(model: nn.Module, kernel_dir: Path) -> int:
    """Give a bf16 model's plain linear layers (on a CPU) the one-row kernel (`Bf16Linear`), and a prepacked
    weight for passes of several rows where it fits (engine/prepacked.py); returns how many."""
    linears = [module for module in model.modules() if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16]
    for module in linears:
        module.__class__ = Bf16Linear
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, Bf16Linear):
        head.fp32_output = True
    _attach_kernel(model, linears, kernel_dir)
    prepack_linears(model)
    return len(linears)


def _upcast_output(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@dataclass(frozen=True)
class StoredWeights:
    """What `store_weights_in_bf16` did: how many weights moved to bf16 and stayed as they were, bytes saved."""

    num_bf16: int
    num_fp32: int
    bytes_saved: int


def _convertible(module: nn.Module) -> bool:
    """Only the plain classes: a subclass (a scaled embedding, a model's own linear) computes in ways of its own."""
    return type(module) in (nn.Linear, nn.Embedding)


def store_weights_in_bf16(model: nn.Module, kernel_dir: Path | None) -> StoredWeights:
    """Store the fp32 weights of `model`'s linear layers (and plain embeddings) in bf16 where that is exact.

    `kernel_dir`: where the one-row kernel is kept (None: one-row passes use a bf16 linear).
    """
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(module)
    num_bf16 = num_fp32 = bytes_saved = 0
    for modules in owners.values():
        weight = modules[0].weight
        if weight.dtype != torch.float32 or not all(_convertible(module) for module in modules):
            num_fp32 += any(_convertible(module) for module in modules)
            continue
        stored = weight.detach().to(torch.bfloat16)
        if not torch.equal(stored.float(), weight.detach()):  # not a 16-bit checkpoint's value: keep it
            num_fp32 += 1
            continue
        shared = nn.Parameter(stored, requires_grad=False)
        for module in modules:
            module.weight = shared
            if isinstance(module, nn.Linear):
                module.__class__ = Bf16StoredLinear
            else:
                module.register_forward_hook(_upcast_output)
        num_bf16 += 1
        bytes_saved += weight.numel() * 2
    linears = [module for module in model.modules() if isinstance(module, Bf16StoredLinear)]
    if kernel_dir is not None:
        _attach_kernel(model, linears, kernel_dir)
    return StoredWeights(num_bf16, num_fp32, bytes_saved)


def _attach_kernel(model: nn.Module, linears: list[Bf16StoredLinear], kernel_dir: Path) -> None:
    """Join `linears`' siblings, then give them all a few-rows kernel: the built one of engine/kernels (any
    row count below FP32_WEIGHTS_FROM_ROWS, the same bits per row in any batch; for bf16 rows on packed
    copies of the weights where they fit), else the AOTInductor one-row kernel, else none (eager linears)."""
    if not linears:
        return
    groups = _join_siblings(model)
    weights = [module.weight for module in linears] + [group.weight for group in groups]
    product = _built_product(linears, groups, weights, kernel_dir)
    if product is not None:
        for module in linears:
            module.one_row, module.few_rows, module.fp32_rows = product, FP32_WEIGHTS_FROM_ROWS - 1, False
        return
    kernel = _one_row_kernel(weights, kernel_dir)
    for module in linears:
        module.one_row = kernel


def _built_product(linears: list[Bf16StoredLinear], groups: list[_SiblingRows], weights: list[torch.Tensor],
                   kernel_dir: Path) -> OneRowProduct | None:  # fmt: skip
    """engine/kernels' few-rows product for these layers, checked on every weight shape (bf16 rows: on a packed
    copy of the weights where it fits); None where it is not built or does not match torch's."""
    bf16_rows = isinstance(linears[0], Bf16Linear)
    built = load_cpu_kernels(kernel_dir)
    product = built.bf16_rows_product if bf16_rows else built.rows_product
    if product is None:
        return None
    mismatch = _mismatched_shape(product, weights, 3, torch.bfloat16 if bf16_rows else torch.float32)
    if mismatch is not None:
        log.warning("the built few-rows kernel differs from torch's product on a %s weight: not used", mismatch)
        return None
    if bf16_rows and built.packed_rows_product is not None and copy_fits(_distinct_bytes(weights),
                                                                         "decode products' packed copy"):  # fmt: skip
        targets = [group.weight for group in groups] + [module.weight for module in linears if module.siblings is None]
        product = _PackedRows(built, targets)
        log.info("decode products read a packed copy of the linear weights (%.2f GB)", product.num_bytes / 1e9)
    return product


def _distinct_bytes(weights: list[torch.Tensor]) -> int:
    return sum(weight.numel() * weight.element_size() for weight in {id(w): w for w in weights}.values())


def _mismatched_shape(product: OneRowProduct, weights: list[torch.Tensor], rows: int,
                      row_dtype: torch.dtype) -> tuple[int, ...] | None:  # fmt: skip
    """The first weight shape on which `product` of `rows` rows of ones differs from torch's sums beyond
    rounding (they add in another order); None where it matches on every shape."""
    with torch.inference_mode():
        for weight in {weight.shape: weight for weight in weights}.values():
            ones = torch.ones(rows, weight.shape[1], dtype=row_dtype, device=weight.device)
            expected = weight.float().sum(-1).expand(rows, -1)
            tolerance = 1e-4 * float(expected.abs().max())
            if not torch.allclose(product(ones, weight), expected, rtol=1e-4, atol=tolerance):
                return tuple(weight.shape)
    return None


def _join_siblings(model: nn.Module) -> list[_SiblingRows]:
    """Store each group of `SIBLINGS` (bf16-stored, same input size, no bias, weights of their own) as one tensor."""
    num_owners: dict[int, int] = {}
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            num_owners[id(module.weight)] = num_owners.get(id(module.weight), 0) + 1
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(member, Bf16StoredLinear) and member.bias is None for member in members):
                continue
            if len({type(member) for member in members}) != 1:
                continue
            if len({member.in_features for member in members}) != 1:
                continue
            if any(num_owners.get(id(member.weight), 0) != 1 for member in members):
                continue
            joined = torch.cat([member.weight.detach() for member in members])
            group = _SiblingRows(joined)
            start = 0
            for member in members:
                end = start + member.out_features
                member.weight = nn.Parameter(joined[start:end], requires_grad=False)  # a view: no second copy
                member.siblings, member.sibling_rows = group, (start, end)
                start = end
            groups.append(group)
    return groups


_MIN_SIZE = 2  # torch.export treats sizes 0 and 1 as constants: a symbolic size starts at 2


def _one_row_kernel(weights: list[torch.Tensor], kernel_dir: Path) -> OneRowProduct | None:
    """The built kernel, checked on each weight shape; None (with one warning) where it cannot be had."""
    if any(min(weight.shape) < _MIN_SIZE for weight in weights):
        log.warning("a linear layer has fewer than %d inputs or outputs: decode steps run eager bf16 linears", _MIN_SIZE)
        return None
    try:
        kernel = _load_or_build(kernel_dir)
        mismatch = _mismatched_shape(kernel, weights, 1, torch.float32)
        if mismatch is not None:
            raise RuntimeError(f"the one-row kernel differs from torch's product on a {mismatch} weight")
    except Exception as exc:  # export and inductor raise many types (no compiler, a failed build); all mean: run eager
        log.warning("building the one-row kernel for bf16-stored weights failed, decode steps run eager "
                    "bf16 linears instead (slower): %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return kernel


def _load_or_build(kernel_dir: Path) -> OneRowProduct:
    """The kernel package of this torch version in `kernel_dir`, built there first if it is not."""
    import torch._inductor  # noqa: F401  (not imported with torch)

    package = kernel_dir / f"one-row-product-torch{torch.__version__}.pt2"
    if not package.is_file():
        log.info("building the one-row kernel for bf16-stored weights (once per torch version): %s", package)
        kernel_dir.mkdir(parents=True, exist_ok=True)
        inputs, outputs = torch.export.Dim("inputs", min=_MIN_SIZE), torch.export.Dim("outputs", min=_MIN_SIZE)
        example = (torch.ones(1, 64), torch.ones(48, 64, dtype=torch.bfloat16))
        program = torch.export.export(_OneRowProduct(), example, dynamic_shapes=({1: inputs}, {0: outputs, 1: inputs}))
        handle, partial = tempfile.mkstemp(dir=kernel_dir, prefix="partial-", suffix=".pt2")  # AOTI wants .pt2
        os.close(handle)
        try:  # built beside its name and renamed: a process that loads it never sees half a file
            torch._inductor.aoti_compile_and_package(program, package_path=partial)
            os.replace(partial, package)
        finally:
            Path(partial).unlink(missing_ok=True)
    return torch._inductor.aoti_load_package(str(package))
