"""CPU kernels of our own, built from C++ source on the machine that runs them.

`one_row_attention.cpp`: a decode step's attention (one query row per head
against the cache's K/V, fp32 or bf16): every key and value row is read once,
widened to fp32 in registers and used by all the query heads of its group,
with the softmax in fp32 (AVX-512). torch's own paths read a bf16 cache at a
fraction of the memory bandwidth (docs/benchmarks.md).

Built with torch's extension builder (`torch.utils.cpp_extension`, which
needs a C++ compiler and ninja) and `-march=native`, once per source, torch
version and CPU into `kernel_dir` (the loader passes `$KVCELLAR_HOME/kernels`),
then loaded from there. Where it cannot be built, or the CPU has no AVX-512
(the vector path; its plain loops are no faster than torch), one warning and
the engine keeps torch's path (`load_one_row_attention` returns None).

Operations: `load_one_row_attention(kernel_dir) -> OneRowAttention | None`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("one_row_attention.cpp")
# -fopenmp: at::parallel_for is compiled into the kernel, and without OpenMP it runs on one thread. The library
# links libgomp.so.1 by name, so in a torch process it shares torch's OpenMP runtime and its thread count.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")

# (query [B, H, D] fp32 pre-scaled, key, value [B, H_kv, >= n, D] fp32/bf16, n) -> [B, H, D] fp32
OneRowAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

_loaded: dict[Path, OneRowAttention | None] = {}  # one build and load per process and folder


def load_one_row_attention(kernel_dir: Path) -> OneRowAttention | None:
    """The built decode-attention op, or None (with one warning) where it cannot be had or is not faster."""
    if kernel_dir not in _loaded:
        _loaded[kernel_dir] = _build_and_check(kernel_dir)
    return _loaded[kernel_dir]


def _build_and_check(kernel_dir: Path) -> OneRowAttention | None:
    try:
        op = _build(kernel_dir)
    except Exception as exc:  # a missing compiler or ninja, a failed build: all mean torch's path
        log.warning("building the CPU decode-attention kernel failed, decode steps use torch's attention "
                    "(slower): %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)  # fmt: skip
        return None
    if not torch.ops.kvcellar_cpu.vectorized():
        log.info("this CPU has no AVX-512: decode steps use torch's attention")
        return None
    return op


def _build(kernel_dir: Path) -> OneRowAttention:
    if not hasattr(torch.ops.kvcellar_cpu, "one_row_attention"):  # registered by an earlier load in this process
        from torch.utils import cpp_extension

        folder = kernel_dir / f"cpu-attention-{_build_key()}"
        folder.mkdir(parents=True, exist_ok=True)
        log.info("loading the CPU decode-attention kernel from %s (built there first if it is not)", folder)
        cpp_extension.load("kvcellar_cpu_kernels", sources=[str(SOURCE)], extra_cflags=list(FLAGS),
                           extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False)  # fmt: skip
    return torch.ops.kvcellar_cpu.one_row_attention


def _build_key() -> str:
    """What the built library depends on: the source, the flags, torch's version and (-march=native) the CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
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
