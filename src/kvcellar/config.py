"""Configuration: one frozen dataclass per subsystem, validated on construction, the only home of defaults.

Operations: `EngineConfig` (model, device, dtype, block), `CacheConfig` (its
prefix cache), `ServerSettings` (`kvcellar serve`), `parse_size` (human
sizes such as "4G") and its inverses `size_text` (exact, for flags: "4G")
and `format_size` (for messages: "4.0 GiB"), `default_block_size(device_type)`.

Command-line flags, environment variables and config files all end up here;
argparse lives only in `kvcellar.cli`, which reads its defaults (and the
"default: ..." of its help) from these fields; docs/configuration.md quotes
the same values (tests/cli/test_config_defaults.py holds both to them).
No torch here: `device="auto"` and `dtype="auto"` are resolved when the
model loads (`kvcellar.engine.loader.resolve_device` / `resolve_dtype`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import KW_ONLY, dataclass, field

from kvcellar.checks import is_int, is_number

from kvcellar.cache.policy import DEFAULT_EVICTION_POLICY, EVICTION_POLICIES
from kvcellar.tiers.remote.address import RemoteAddress

DEVICES = ("auto", "cpu", "cuda", "mps")
# "float32-bf16-weights": fp32 activations and K/V, weights stored in bf16 where bf16 holds them exactly
# (engine/weights.py); "auto" picks it on a CPU without bf16 instructions (other weights stay fp32).
DTYPES = ("auto", "bfloat16", "float16", "float32", "float32-bf16-weights")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "fp32-bf16w": "float32-bf16-weights"}  # fmt: skip
LOG_LEVELS = ("debug", "info", "warning", "error")

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


def size_text(num_bytes: int) -> str:
    """The exact inverse of parse_size, in the largest unit that divides it: 2 GiB -> "2G", 1536 -> "1536"."""
    for unit in ("t", "g", "m", "k"):
        scale = _SIZE_UNITS[unit]
        if num_bytes and num_bytes % scale == 0:
            return f"{num_bytes // scale}{unit.upper()}"
    return str(num_bytes)


# Default block per device, chosen by measurement (figures: docs/benchmarks.md). Small, so that a chat
# or an agent loop reuses fine-grained (a prompt shorter than a block reuses nothing). Where a prefill
# pass may span many blocks (the blocks are sliced out of it: only full-attention layers, and no
# exact-mode cache, or the row-invariant schedule on a CPU) the block does not set the pass length.
# Where each pass must be one block (exact mode on a GPU; sliding-window or recurrent layers, whose
# state cannot be handed over at a block end inside a pass), a GPU, which pays a fixed launch cost per
# forward and wants long passes, takes the long block of ONE_BLOCK_PASS_BLOCK_SIZE instead.
DEFAULT_BLOCK_SIZE = {"cpu": 256, "mps": 256, "cuda": 256}
ONE_BLOCK_PASS_BLOCK_SIZE = {"cuda": 2048}
# Exact mode (bit-identical output with the cache) by default where it costs a prefill nothing
# measurable: on a CPU through the row-invariant schedule. On a GPU the attention kernels round a row
# differently with the pass it falls in, so exactness there needs one-block passes through a slower
# kernel; near mode (equal within rounding, as every peer's prefix cache) is the default there
# (docs/configuration.md, "Exact and near reuse").
DEFAULT_EXACT = {"cpu": True, "mps": True, "cuda": False}
# Prefill pass without an exact-mode cache, for models whose layers are all full attention
# (engine/prefill.py says why longer passes are faster and why not in exact mode). A device not
# listed prefills one block per pass.
PREFILL_CHUNK_SIZE = {"cpu": 1024, "cuda": 32768}
# How a prefill is cut into forward passes (engine/prefill.py): "fixed", the schedule aligned to position 0
# that makes exact mode bit-identical by construction; "row-invariant", passes of up to the prefill chunk
# starting at any block boundary, exact where the machine's kernels round a row alike in any pass of at least
# ROW_INVARIANT_MIN_ROWS rows (checked at load, engine/invariance.py); "auto", row-invariant where it applies
# (CPU, exact mode, only full-attention layers) and the check holds, else fixed.
PREFILL_SCHEDULES = ("auto", "fixed", "row-invariant")
# The K/V that running requests may hold together (engine/scheduler.py), when `kv_budget_bytes` is not
# given: this share of the memory available when the model has loaded (RAM on a CPU, free memory on a GPU).
RUNNING_KV_MEMORY_FRACTION = 0.4
# Fewer rows than this take other matrix kernels on the CPUs measured (docs/configuration.md).
ROW_INVARIANT_MIN_ROWS = 16
# With weights stored in bf16 (DTYPES), a pass of at least this many rows multiplies them upcast to fp32
# (a prefill: bit-identical to an fp32 model); a shorter one (a decode step) reads them as bf16, the
# bytes a memory-bound step reads halved. Equal to ROW_INVARIANT_MIN_ROWS so that a row-invariant
# prefill never takes the bf16 path.
FP32_WEIGHTS_FROM_ROWS = ROW_INVARIANT_MIN_ROWS
# Exact mode decodes at most this many requests in one forward pass (engine/scheduler.py), more in
# passes of their own: a pass of more rows multiplies through a prefill's kernels (FP32_WEIGHTS_FROM_ROWS,
# oneDNN), which round a row otherwise than a decode step of one request does.
EXACT_DECODE_MAX_ROWS = FP32_WEIGHTS_FROM_ROWS - 1


def default_block_size(device_type: str, one_block_passes: bool = False) -> int:
    """The block size used when none is given, for a resolved device type: "cpu", "cuda" or "mps".

    `one_block_passes`: each prefill pass must be one block (see DEFAULT_BLOCK_SIZE). "auto" is not a
    device type: the engine resolves it when the model loads (engine/loader.py).
    """
    if device_type not in DEFAULT_BLOCK_SIZE:
        raise ValueError(f"no default block size for device type {device_type!r}: use one of {', '.join(DEFAULT_BLOCK_SIZE)}")
    if one_block_passes:
        return ONE_BLOCK_PASS_BLOCK_SIZE.get(device_type, DEFAULT_BLOCK_SIZE[device_type])
    return DEFAULT_BLOCK_SIZE[device_type]


def default_exact(device_type: str) -> bool:
    """Whether a cache with `exact=None` runs in exact mode on this device type (DEFAULT_EXACT)."""
    if device_type not in DEFAULT_EXACT:
        raise ValueError(f"no default reuse mode for device type {device_type!r}: use one of {', '.join(DEFAULT_EXACT)}")
    return DEFAULT_EXACT[device_type]


def normalize_dtype(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} (or bf16/fp16/fp32/fp32-bf16w)")
    return name


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The prefix cache of one engine.

    `exact`: reuse only state that a prefill without the cache would have
    computed bit for bit, so output with the cache is bit-identical to output
    without it. Off (near mode), partial blocks, prompt tails and
    decode-produced KV are reused too (equal within rounding, and a shorter
    time to first token on multi-turn chats). None: the device's default,
    `DEFAULT_EXACT` (on for CPUs, off for CUDA), resolved when the model
    loads. docs/configuration.md explains the trade-off.
    """

    enabled: bool = True
    device_cache_bytes: int = 2 * 1024**3
    max_partial_entries: int = 16
    exact: bool | None = None
    eviction_policy: str = DEFAULT_EVICTION_POLICY
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
    # The shared tier (tiers/remote): a Redis/Valkey URL (redis://, rediss://, unix://); None: no shared tier.
    # Servers of the same model, layout and salt share its entries; its size is the server's own maxmemory.
    remote_cache: str | None = None
    remote_timeout_s: float = 0.5  # per exchange; past it the tier is down (a miss) until it answers again
    remote_key_prefix: str = "kvcellar:"  # every key name starts with it (ACLs per deployment: ~prefix*)
    remote_write_queue_bytes: int = 1024**3  # write-behind memory for the shared tier; past it writes drop, counted
    # Publish BlockStored/BlockRemoved/AllBlocksCleared in vLLM's KV-event format (ZMQ PUB); None: off.
    kv_events_endpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("device_cache_bytes", "disk_cache_bytes", "host_cache_bytes", "disk_write_queue_bytes"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be a byte count >= 0, e.g. parse_size('4G') (got {value!r})")
        if self.exact is not None and not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True, False or None (the device's default), got {self.exact!r}")
        if self.remote_cache is not None:
            RemoteAddress.parse(self.remote_cache)  # ValueError naming the accepted forms
        if not is_number(self.remote_timeout_s) or not 0 < self.remote_timeout_s < float("inf"):
            raise ValueError(f"remote_timeout_s (--remote-timeout) must be a number of seconds > 0 (got {self.remote_timeout_s!r})")
        if not isinstance(self.remote_key_prefix, str) or not self.remote_key_prefix or any(c in self.remote_key_prefix for c in "*?[]"):
            raise ValueError(f"remote_key_prefix (--remote-prefix) must be a non-empty string without *?[] (got {self.remote_key_prefix!r})")
        if not is_int(self.remote_write_queue_bytes) or self.remote_write_queue_bytes <= 0:
            raise ValueError(f"remote_write_queue_bytes must be a byte count > 0 (got {self.remote_write_queue_bytes!r})")
        if self.kv_events_endpoint is not None and not str(self.kv_events_endpoint).startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"kv_events_endpoint (--kv-events-endpoint) must be a ZMQ address such as tcp://*:5557 (got {self.kv_events_endpoint!r})")
        if self.disk_write_queue_bytes == 0:
            raise ValueError("disk_write_queue_bytes must be > 0: the disk tier writes through this queue")
        if isinstance(self.cache_dir, os.PathLike):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise ValueError(f"cache_dir must be a folder path or None (no disk tier), got {self.cache_dir!r}")
        if not is_number(self.drain_timeout_s) or not (
            0 <= self.drain_timeout_s < float("inf")
        ):
            raise ValueError(f"drain_timeout_s (--drain-timeout) must be a number of seconds >= 0 (got {self.drain_timeout_s!r})")
        if self.max_partial_entries < 0:
            raise ValueError(
                f"max_partial_entries (--tail-cache-entries) must be >= 0, 0 disables tails (got {self.max_partial_entries})"
            )
        if self.eviction_policy not in EVICTION_POLICIES:
            choices = " or ".join(EVICTION_POLICIES)
            raise ValueError(f"unknown eviction policy {self.eviction_policy!r}: choose {choices}")


@dataclass(frozen=True)
class EngineConfig:
    """How to load and run one model: `EngineConfig(model, device=..., ...)` (all but `model` by keyword).

    `device`: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or
    "mps"; `dtype`: "auto", bfloat16/float16/float32 (bf16, fp16, fp32
    too) or float32-bf16-weights (fp32 compute, 16-bit weight storage:
    engine/weights.py). Both "auto"s are resolved when the model loads (engine/loader.py).
    `block_size` is the cache block. None: the default of the device the
    model loads on (`default_block_size`). `prefill_chunk_size` (a multiple
    of it) is the prefill's longest forward pass (engine/prefill.py). None:
    `PREFILL_CHUNK_SIZE` of the device without an exact-mode cache for
    models whose layers are all full attention, else one block (on a CPU the
    row-invariant schedule's own); it is also what one scheduler step
    prefills between decode steps. `kv_budget_bytes`: the K/V that running
    requests hold together (engine/scheduler.py); None:
    `RUNNING_KV_MEMORY_FRACTION` of the memory free after loading. `prefill_schedule`: one of
    `PREFILL_SCHEDULES` (see there). `Engine.config` holds the values the
    engine resolved (`resolved`, then the schedule's: a concrete block size,
    exact mode, chunk and schedule); device and dtype stay as asked.
    """

    model: str
    _: KW_ONLY
    device: str = "auto"
    dtype: str = "auto"
    block_size: int | None = None
    num_threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefill_chunk_size: int | None = None
    prefill_schedule: str = "auto"
    kv_budget_bytes: int | None = None  # running requests' K/V together; None: RUNNING_KV_MEMORY_FRACTION

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a local Hugging Face model folder")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)} (cuda:N also works)")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.block_size is not None and (not is_int(self.block_size) or not 1 <= self.block_size <= 65536):
            raise ValueError(f"block_size must be between 1 and 65536 tokens (got {self.block_size!r})")
        chunk = self.prefill_chunk_size
        if chunk is not None and (not is_int(chunk) or chunk < 1 or (self.block_size is not None and chunk % self.block_size)):
            shown = self.block_size if self.block_size is not None else "the device's default"
            raise ValueError(f"prefill_chunk_size must be a multiple of the block size ({shown}), got {chunk!r}")
        if self.prefill_schedule not in PREFILL_SCHEDULES:
            raise ValueError(f"prefill_schedule must be one of {', '.join(PREFILL_SCHEDULES)} (got {self.prefill_schedule!r})")
        if self.num_threads is not None and (not is_int(self.num_threads) or self.num_threads < 1):
            raise ValueError(f"num_threads must be >= 1 (got {self.num_threads!r})")
        if self.kv_budget_bytes is not None and (not is_int(self.kv_budget_bytes) or self.kv_budget_bytes < 1):
            raise ValueError(f"kv_budget_bytes (--kv-budget) must be a size > 0 (got {self.kv_budget_bytes!r})")

    def resolved(self, device_type: str, only_full_attention: bool = True) -> EngineConfig:
        """This config with the defaults of `device_type` filled in (checked again): the cache's exact
        mode, then the block size, which is long on a GPU where each pass must be one block (an
        exact-mode cache, or `only_full_attention` False: the model has sliding-window or recurrent layers)."""
        cache = self.cache
        if cache.exact is None:
            cache = dataclasses.replace(cache, exact=default_exact(device_type))
        one_block_passes = (cache.enabled and cache.exact and device_type != "cpu") or not only_full_attention
        block = self.block_size or default_block_size(device_type, one_block_passes)
        return dataclasses.replace(self, cache=cache, block_size=block)


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How `kvcellar serve` listens and whom it serves.

    `api_keys`: key -> bound salt (None = an admin key, which may also clear
    and resize the cache). Empty means no authentication (bind to 127.0.0.1).
    `default_salt`: the cache salt of requests that send none.
    `default_max_tokens`: used when a request gives no max_tokens (capped by
    the context left after the prompt). `metrics_public`: GET /metrics
    answers without a key (with keys set it otherwise needs an admin key:
    its figures cover every tenant).
    `max_request_bytes`: the largest request body read (413 above it). The
    default, 8 MiB, holds a prompt filling a 128K-token context even when a
    client escapes every character as JSON `\\uXXXX` (about 4 characters per
    token, 6 bytes per escaped character: 3 MiB), with room to spare, while
    capping what one request can make the server hold.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: dict[str, str | None] = field(default_factory=dict)
    default_salt: str = ""
    log_level: str = "warning"
    default_max_tokens: int = 256
    num_recent_requests: int = 100
    rate_interval_s: float = 5.0
    max_concurrent_streams: int = 256
    metrics_public: bool = False
    max_request_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (got {self.port!r})")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)} (got {self.log_level!r})")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1 (got {self.default_max_tokens})")
        if self.num_recent_requests < 1:
            raise ValueError(f"num_recent_requests must be >= 1 (got {self.num_recent_requests})")
        if self.rate_interval_s <= 0:
            raise ValueError(f"rate_interval_s must be > 0 (got {self.rate_interval_s})")
        if self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1 (got {self.max_concurrent_streams})")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, room for a small request (got {self.max_request_bytes})")

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)
