"""What a benchmark ran on, and how much of the machine it had.

Operations: `hardware(device)` (CPU model, cores, memory, GPU name, versions,
date), `Usage.start()` / `.finish()` (CPU seconds over wall seconds: about
the thread count when the cores were ours, much less when other processes
shared them; minor page faults), `memory_report(device)` (RSS now and its
peak; CUDA peak), `reset_peak_rss()` (the peak starts again from RSS now, so
one request's peak is its own).
"""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MIB = 1024**2


def _proc_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path(path).read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu(device: str) -> dict:
    import torch

    from kvcellar.engine.loader import device_type

    if not torch.cuda.is_available() or device_type(device) != "cuda":
        return {}
    index = int(device.split(":")[1]) if ":" in device else 0
    props = torch.cuda.get_device_properties(index)
    return {"gpu": torch.cuda.get_device_name(index), "gpu_memory_bytes": props.total_memory,
            "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda}  # fmt: skip


def hardware(device: str = "auto") -> dict:
    """JSON-ready facts about this machine (the in-process target's, not a remote server's)."""
    import torch
    import transformers

    from kvcellar import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_kib = _proc_kib("MemTotal", "/proc/meminfo")
    return {
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem_kib * 1024 if mem_kib else None, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "kvcellar": __version__, **_gpu(device), "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU time of this process (and its finished children) against wall time; minor faults of this process."""

    cpu_s: float
    wall_s: float
    minor_faults: int = 0

    @staticmethod
    def _cpu_s() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            u = resource.getrusage(who)
            total += u.ru_utime + u.ru_stime
        return total

    @classmethod
    def start(cls) -> Usage:
        return cls(cls._cpu_s(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def finish(self) -> dict:
        cpu_s, wall_s = self._cpu_s() - self.cpu_s, time.perf_counter() - self.wall_s
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.minor_faults
        return {"cpu_s": cpu_s, "wall_s": wall_s, "cpu_util": cpu_s / wall_s if wall_s > 0 else 0.0, "loadavg_1m": load,
                "minor_faults": faults}  # fmt: skip


def memory_report(device: object = None) -> dict:
    """RSS now and its high-water mark (Linux /proc; else ru_maxrss); CUDA peak when on a GPU."""
    now, peak = _proc_kib("VmRSS"), _proc_kib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_mib": now / 1024 if now else None, "peak_rss_mib": peak / 1024}
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return out


def reset_peak_rss() -> None:
    """Linux >= 4.0: VmHWM := VmRSS, so the next `memory_report()` peak is what came after; elsewhere a no-op."""
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")
