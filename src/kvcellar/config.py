"""Configuration: one frozen dataclass per subsystem, validated on construction.

Operations: `EngineConfig`, `CacheConfig`, `parse_size` (human sizes such as "4G").
Command-line flags, environment variables and config files all end up here;
argparse lives only in `kvcellar.cli`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a human size: "4G", "512MiB", "1.5g", "0", or a plain int (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative (got {text})")
        return text
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise ValueError(f"cannot read the size {text!r}: write a number with an optional unit, e.g. 512M, 4G, 0")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def format_size(num_bytes: int) -> str:
    """The inverse of parse_size, for messages: 1536 -> "1.5 KiB"."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Default block per device, chosen by measurement (figures: docs/benchmarks.md). On a CPU the block is
# small so that exact mode reuses a chat fine-grained (a chat prompt shorter than a block reuses
# nothing); without an exact-mode cache the prefill runs 1024-token chunks where the model allows
# (engine/prefill.py), since fewer, longer forwards prefill faster; in exact mode one block, so that a
# growing chat is not prefilled twice. A GPU pays a fixed kernel-launch cost per forward and wants
# long kernels, so its block is long.
DEFAULT_BLOCK_SIZE = {"cpu": 256, "mps": 256, "cuda": 2048}


def default_block_size(device: str) -> int:
    """The block size used when none is given, for a device name ('auto' is resolved as the engine does)."""
    kind = device.split(":")[0]
    if kind == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return DEFAULT_BLOCK_SIZE[kind]


def normalize_dtype(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} (or bf16/fp16/fp32)")
    return name


@dataclass(frozen=True)
class CacheConfig:
    """The prefix cache of one engine.

    `exact`: reuse only state produced on the fixed, block-aligned prefill
    schedule, so output with the cache is bit-identical to output without it.
    Off, partial blocks, prompt tails and decode-produced KV are reused too
    (equal within rounding, and a shorter time to first token on multi-turn
    chats). docs/configuration.md explains the trade-off.
    """

    enabled: bool = True
    device_cache_bytes: int = 2 * 1024**3
    max_partial_entries: int = 16
    exact: bool = True
    eviction_policy: str = "priority-lru"
    tenant_salt: str = ""
    # Persistent and host tiers. The disk tier exists only with a cache_dir; the host tier only
    # when the model runs on a GPU (on a CPU run, device memory is host memory).
    cache_dir: str | None = None
    disk_cache_bytes: int = 16 * 1024**3
    host_cache_bytes: int = 4 * 1024**3
    use_disk_tier: bool = True
    use_host_tier: bool = True
    disk_write_queue_bytes: int = 1024**3  # write-behind memory; past it, new writes are dropped (counted)
    # Weigh each restore against recomputing, from measured rates (cache/cost_model.py). Off: restore every
    # hit whatever it costs (to measure a tier itself, or where timing must not decide what is restored).
    cost_model: bool = True
    # On close (SIGTERM/SIGINT/SIGHUP to a server), queued disk writes get this long to become durable.
    drain_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("device_cache_bytes", "disk_cache_bytes", "host_cache_bytes", "disk_write_queue_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a byte count >= 0, e.g. parse_size('4G') (got {value!r})")
        if self.disk_write_queue_bytes == 0:
            raise ValueError("disk_write_queue_bytes must be > 0: the disk tier writes through this queue")
        if isinstance(self.cache_dir, os.PathLike):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise ValueError(f"cache_dir must be a folder path or None (no disk tier), got {self.cache_dir!r}")
        if isinstance(self.drain_timeout_s, bool) or not isinstance(self.drain_timeout_s, (int, float)) or not (
            0 <= self.drain_timeout_s < float("inf")
        ):
            raise ValueError(f"drain_timeout_s (--drain-timeout) must be a number of seconds >= 0 (got {self.drain_timeout_s!r})")
        if self.max_partial_entries < 0:
            raise ValueError(
                f"max_partial_entries (--tail-cache-entries) must be >= 0, 0 disables tails (got {self.max_partial_entries})"
            )
        if self.eviction_policy not in ("priority-lru", "lru"):
            raise ValueError(f"unknown eviction policy {self.eviction_policy!r}: choose priority-lru or lru")


@dataclass(frozen=True)
class EngineConfig:
    """How to load and run one model.

    `block_size` is the cache block. None: the device's default
    (`DEFAULT_BLOCK_SIZE`). `prefill_chunk_size` (a multiple of it) is the
    prefill's forward pass: chunks aligned to absolute position 0 up to the
    prompt's last whole chunk, then one block at a time, which is what makes
    a restored prefix bit-identical to a cold prefill (cache/layout.py).
    None: 1024 tokens on a CPU for models whose layers are all full
    attention, else one block; the engine stores the value it resolved.
    """

    model: str
    device: str = "auto"
    dtype: str = "auto"
    block_size: int | None = None
    num_threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefill_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a local Hugging Face model folder")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)} (cuda:N also works)")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.block_size is None:
            object.__setattr__(self, "block_size", default_block_size(self.device))
        if not 1 <= self.block_size <= 65536:
            raise ValueError(f"block_size must be between 1 and 65536 tokens (got {self.block_size})")
        chunk = self.prefill_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk % self.block_size):
            raise ValueError(f"prefill_chunk_size must be a multiple of the block size ({self.block_size}), got {chunk!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (got {self.num_threads})")
