"""CPU kernels of our own, built from C++ source on the machine that runs them.

- `one_row_attention.cpp`: a decode step's attention (one query row per head
  against the cache's K/V, fp32 or bf16): every key and value row is read
  once, widened to fp32 in registers and used by all the query heads of its
  group, with the softmax in fp32 (AVX-512); bf16 keys meet the bf16 query
  through the CPU's bf16 dot product where it has one (AVX512-BF16: exact
  products, fp32 sums). torch's own paths read a bf16 cache at a fraction of
  the memory bandwidth (docs/benchmarks.md). Its
  batched form takes, per row, chunks of keys to read from shared memory (the
  cache blocks the rows were restored from): rows that share a prefix then
  read its keys from memory once per step, not once per row.
- `causal_attention.cpp`: a bf16 prefill pass's causal attention (the pass's
  queries against the cached prefix and themselves) with the CPU's bf16 dot
  product (AVX512-BF16), about twice the rate of torch's CPU flash kernel. It
  is row-invariant by construction (the file says why), so exact mode runs it
  on whole passes.
- `rows_product.cpp`: a linear layer's product for a few rows (decode
  steps) against bf16 weights, each output summed in an order that depends
  on nothing but the input size, so a row comes out the same bits alone or
  in a batch of any size (what lets exact mode batch decode steps). bf16
  rows use the CPU's bf16 dot product, on a copy of the weight packed for it
  (16 outputs' pairs of inputs side by side, so a broadcast pair of the row
  meets 16 outputs per instruction) where there is one; fp32 rows FMAs of the
  widened weight.
- `append_rows.cpp`: a batched decode step's new keys and values, each row's
  written into its own request's buffers at its own position, in one call
  per layer (two small strided copies per row and layer cost more than the
  bytes they move).

Built with torch's extension builder (`torch.utils.cpp_extension`, which
needs a C++ compiler and ninja) and `-march=native`, once per source, torch
version and CPU into `kernel_dir` (the loader passes `$KVCELLAR_HOME/kernels`),
then loaded from there. Where it cannot be built, one warning and the engine
keeps torch's paths; a kernel whose instructions the CPU lacks (AVX-512 for the
first, AVX512-BF16 for the second) is left out the same way, without a warning.

Operations: `load_cpu_kernels(kernel_dir) -> CpuKernels`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "one_row_attention.cpp", HERE / "causal_attention.cpp", HERE / "rows_product.cpp",
           HERE / "append_rows.cpp")
HEADERS = (HERE / "vector_math.h", HERE / "one_row_chunk.h")
# -fopenmp: at::parallel_for is compiled into the kernel, and without OpenMP it runs on one thread. The library
# links libgomp.so.1 by name, so in a torch process it shares torch's OpenMP runtime and its thread count.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")

# (query [B, H, D] fp32/bf16 unscaled, key, value [B, H_kv, >= n, D] fp32/bf16, n, scale) -> [B, H, D] fp32
OneRowAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
# (query [B, H, D] as above, keys, values: B tensors [1, H_kv, >= n_b, D], [n_b], shared keys, shared values,
# [row, chunk, first key] per shared pair, scale) -> [B, H, D] fp32; row b the same bits as OneRowAttention on row b
# alone. Chunk c of row b (keys [c * CpuKernels.ragged_chunk_keys, ...)) may be read from a shared pair that holds the
# same bytes from its `first` key on.
RaggedOneRowAttention = Callable[[torch.Tensor, list, list, list, list, list, list, float], torch.Tensor]
# (query [B, H, M, D], key, value [B, H_kv, N, D], scale), all bf16 -> [B, M, H, D] bf16
CausalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# (x [R, in] bf16 or fp32, weight [out, in] bf16) -> [R, out] fp32
RowsProduct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# weight [out, in] bf16 (in even) -> its copy packed for `PackedRowsProduct`
PackRowsWeight = Callable[[torch.Tensor], torch.Tensor]
# (x [R, in] bf16, packed weight, out) -> [R, out] fp32
PackedRowsProduct = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# (key states, value states [B, H_kv, 1, D], key buffers, value buffers: B tensors [1, H_kv, capacity, D],
# positions [B]) -> None: row b's keys and values written at positions[b] of its buffers
AppendRows = Callable[[torch.Tensor, torch.Tensor, list, list, list], None]


@dataclass(frozen=True)
class CpuKernels:
    """The kernels this machine runs; None where one cannot be built or the CPU lacks its instructions."""

    one_row_attention: OneRowAttention | None = None
    ragged_one_row_attention: RaggedOneRowAttention | None = None  # with one_row_attention
    ragged_chunk_keys: int = 0  # the keys of one chunk that the ragged kernel may read from shared memory
    causal_attention: CausalAttention | None = None
    rows_product: RowsProduct | None = None  # fp32 rows with AVX-512
    bf16_rows_product: RowsProduct | None = None  # bf16 rows, with AVX512-BF16 too
    pack_rows_weight: PackRowsWeight | None = None  # with AVX512-BF16
    packed_rows_product: PackedRowsProduct | None = None
    append_rows: AppendRows | None = None  # wherever the kernels build


_loaded: dict[Path, CpuKernels] = {}  # one build and load per process and folder


def load_cpu_kernels(kernel_dir: Path) -> CpuKernels:
    """The built kernels this CPU can run (see the module doc); CpuKernels() with one warning if the build fails."""
    if kernel_dir not in _loaded:
        _loaded[kernel_dir] = _build_and_pick(kernel_dir)
    return _loaded[kernel_dir]


def _build_and_pick(kernel_dir: Path) -> CpuKernels:
    try:
        ops = _build(kernel_dir)
    except Exception as exc:  # a missing compiler or ninja, a failed build: all mean torch's paths
        log.warning("building the CPU kernels failed, attention and decode products run on torch's kernels "
                    "(slower): %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)  # fmt: skip
        return CpuKernels()
    kernels = CpuKernels(
        one_row_attention=ops.one_row_attention if ops.vectorized() else None,
        ragged_one_row_attention=ops.ragged_one_row_attention if ops.vectorized() else None,
        ragged_chunk_keys=ops.keys_per_chunk(),
        causal_attention=ops.causal_attention if ops.has_bf16_dot() else None,
        rows_product=ops.rows_product if ops.vectorized() else None,
        bf16_rows_product=ops.rows_product if ops.vectorized() and ops.has_bf16_dot() else None,
        pack_rows_weight=ops.pack_rows_weight if ops.vectorized() and ops.has_bf16_dot() else None,
        packed_rows_product=ops.packed_rows_product if ops.vectorized() and ops.has_bf16_dot() else None,
        append_rows=ops.append_rows,
    )
    log.info("CPU kernels: decode attention %s, bf16 prefill attention %s, bf16 decode products %s",
             "built" if kernels.one_row_attention else "torch's (no AVX-512)",
             "built" if kernels.causal_attention else "torch's (no AVX512-BF16)",
             "built" if kernels.packed_rows_product else "torch's (no AVX512-BF16)")  # fmt: skip
    return kernels


def _build(kernel_dir: Path) -> object:
    """The `torch.ops.kvcellar_cpu` namespace, the library built (or found built) in `kernel_dir` and loaded."""
    if not hasattr(torch.ops.kvcellar_cpu, "one_row_attention"):  # registered by an earlier load in this process
        from torch.utils import cpp_extension

        folder = kernel_dir / f"cpu-attention-{_build_key()}"
        folder.mkdir(parents=True, exist_ok=True)
        log.info("loading the CPU kernels from %s (built there first if they are not)", folder)
        cpp_extension.load("kvcellar_cpu_kernels", sources=[str(source) for source in SOURCES],
                           extra_cflags=list(FLAGS), extra_include_paths=[str(HERE)], extra_ldflags=["-fopenmp"],
                           build_directory=str(folder), is_python_module=False)  # fmt: skip
    return torch.ops.kvcellar_cpu


def _build_key() -> str:
    """What the built library depends on: the sources, the flags, torch's version and (-march=native) the CPU."""
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_flags().encode())
    return f"torch{torch.__version__}-{digest.hexdigest()[:16]}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
