"""Wire a loaded model to its prefix cache: namespace, tiers, one core per tenant salt.

Operations: `build_prefix_cache(loaded, config) -> (prefix cache, CacheRegistry)`,
`CacheRegistry.stats/cores_of/clear/set_budget/core_for_salt`, `.flush` (wait for
disk writes) and `.close` (drain them within a time bound, then release the
disk tier's files and thread: `Engine.close` calls it after the worker
stopped; it returns a `DrainReport`).

Tiers, fastest first: `device` (MemoryTier); `host` (MemoryTier in pinned RAM,
only when the model runs on a GPU); `disk` (DiskTier, only with a cache_dir),
which also receives every inserted entry (write-through, on its background
thread) so a restart finds what was computed even if nothing was evicted.

All salts share the same tiers (and so one byte budget): keys from different
namespace roots never collide, because the root is hashed into every key.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvcellar.cache import (
    BlockHash, CacheStats, LayoutCapabilities, MemoryTier, NamespaceSpec, PrefixCache, namespace_digest,
)  # fmt: skip
from kvcellar.cache.cost_model import CostModel
from kvcellar.config import CacheConfig, EngineConfig
from kvcellar.engine.loader import LoadedModel
from kvcellar.engine.prefix import DisabledPrefixCache, ModelPrefixCache
from kvcellar.kv import inspect_layout
from kvcellar.kv.layout import LAYOUT_VERSION, ModelLayout


@dataclass(frozen=True)
class DrainReport:
    """What closing the cache did with the writes it still held: made durable, or dropped (a miss later)."""

    num_written: int = 0
    num_dropped: int = 0  # still queued when the drain time ran out, or failed while draining
    has_disk_tier: bool = False


@dataclass
class CacheRegistry:
    """The cores of one engine, one per tenant salt, over shared tiers."""

    spec: NamespaceSpec | None
    capabilities: LayoutCapabilities | None
    tiers: list = field(default_factory=list)
    max_partial_entries: int = 0
    uncacheable_reason: str | None = None
    write_through: tuple[str, ...] = ()
    helpers: list = field(default_factory=list)  # the tiers' background helpers: .pause(active), .flush(), .close()
    _cores: dict[str, PrefixCache] = field(default_factory=dict)
    # One lock for the cores and the tiers they share: the worker inserts while server threads
    # read stats, clear tiers or change budgets.
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def core_for_salt(self, salt: str) -> PrefixCache:
        with self._lock:
            core = self._cores.get(salt)
            if core is None:
                root = namespace_digest(self.spec.with_salt(salt) if salt else self.spec)
                core = PrefixCache(
                    root, self.capabilities, self.tiers,
                    max_partial_entries=self.max_partial_entries, write_through=self.write_through, lock=self._lock,
                )  # fmt: skip
                self._cores[salt] = core
            return core

    def stats(self) -> list[CacheStats]:
        """One snapshot per tenant salt in use (the default salt is "")."""
        with self._lock:
            cores = list(self._cores.values())
        return [core.stats() for core in cores]

    def cores_of(self, salts: Callable[[str], bool]) -> list[PrefixCache]:
        """The cores of the salts in use that `salts` accepts (a tenant's namespaces)."""
        with self._lock:
            return [core for salt, core in self._cores.items() if salts(salt)]

    def clear(self, tier_name: str | None = None) -> None:
        """Drop the entries of one tier, or of all of them, for every salt."""
        with self._lock:
            for core in self._cores.values():
                core.clear(tier_name)
            for tier in self.tiers:
                if tier_name is None or tier.name == tier_name:
                    tier.clear()

    @contextlib.contextmanager
    def computing(self):
        """Around a prefill: tiers that write in the background (disk) hold their writes back."""
        deferring = [tier for tier in self.tiers if hasattr(tier, "defer_writes")]
        for tier in deferring:
            tier.defer_writes(True)
        try:
            yield
        finally:
            for tier in deferring:
                tier.defer_writes(False)

    @contextlib.contextmanager
    def serving(self):
        """Around a whole request, decode included: background helpers (pinned-memory allocation) pause."""
        for helper in self.helpers:
            helper.pause(True)
        try:
            yield
        finally:
            for helper in self.helpers:
                helper.pause(False)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every tier's queued writes are durable (and demotion copies landed); False on timeout."""
        return all([tier.flush(timeout_s) for tier in self.tiers] + [helper.flush(timeout_s) for helper in self.helpers])

    def close(self, timeout_s: float | None = 30.0) -> DrainReport:
        """Drain queued writes for up to `timeout_s` in all, then release every tier (files, writer thread,
        directory lock) and helper. Idempotent: a second call finds nothing queued."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        writing = [tier for tier in self.tiers if hasattr(tier, "defer_writes")]  # tiers with a write-behind queue
        before = {tier.name: tier.stats().counters for tier in writing}
        for tier in self.tiers:
            tier.flush(left())
        num_written = num_dropped = 0
        for tier in writing:
            after = tier.stats().counters
            num_written += after["num_written"] - before[tier.name]["num_written"]
            num_dropped += after["num_dropped"] - before[tier.name]["num_dropped"] + after["num_queued"]
            tier.close(left())
        for tier in self.tiers:
            if tier not in writing:
                tier.close()
        for helper in self.helpers:
            helper.close()
        return DrainReport(num_written, num_dropped, bool(writing))

    def set_budget(self, tier_name: str, budget_bytes: int) -> None:
        """Change one tier's budget; evictions go through a core so they are counted."""
        with self._lock:
            core = next(iter(self._cores.values()), None)
            if core is not None:
                core.set_budget_bytes(budget_bytes, tier_name)
            else:
                next(t for t in self.tiers if t.name == tier_name).set_budget(budget_bytes)


def build_prefix_cache(loaded: LoadedModel, config: EngineConfig) -> tuple[ModelPrefixCache | DisabledPrefixCache, CacheRegistry]:
    cache_config = config.cache
    model_config = loaded.model.config
    layout = inspect_layout(model_config)
    if not cache_config.enabled or not layout.is_cacheable:
        reason = "disabled by configuration" if not cache_config.enabled else layout.uncacheable_reason
        return DisabledPrefixCache(model_config), CacheRegistry(None, None, uncacheable_reason=reason)
    chunk = config.prefill_chunk_size or config.block_size
    spec = NamespaceSpec(
        model_fingerprint=loaded.fingerprint,
        dtype=str(loaded.dtype).removeprefix("torch."),
        block_size=config.block_size,
        layout_version=LAYOUT_VERSION,
        exact=cache_config.exact,
        tenant_salt=cache_config.tenant_salt,
        chunk_size=chunk if chunk > config.block_size else None,  # None keeps the digests of one-block chunks
    )
    tiers, helpers = _build_tiers(loaded, layout, cache_config, config.block_size)
    write_through = ("disk",) if any(tier.name == "disk" for tier in tiers) else ()
    registry = CacheRegistry(
        spec, layout.capabilities(config.block_size, chunk), tiers, cache_config.max_partial_entries, write_through=write_through,
        helpers=helpers,
    )  # fmt: skip
    prefix_cache = ModelPrefixCache(
        registry.core_for_salt, model_config, layout, config.block_size, cache_config.exact, loaded.device,
        computing=registry.computing, serving=registry.serving, weigh_restores=cache_config.cost_model,
    )
    prime_load_rates(tiers, prefix_cache.cost_model, namespace_digest(spec))  # the default salt's namespace
    return prefix_cache, registry


def prime_load_rates(tiers: list, cost_model: CostModel, namespace: BlockHash) -> None:
    """Time one stored block of `namespace` loading from each tier that persists across restarts (`sample_key`).

    Without it, a process started on a full cache folder loads its first hits whatever they cost, to
    find out: on an H100 with the 0.6B shape the first 8K-token restart hit read the disk for 0.64 s,
    where a prefill takes 0.11 s. The cost model then weighs the first hits against a measured rate.
    """
    for tier in tiers:
        key = tier.sample_key(namespace) if hasattr(tier, "sample_key") else None
        if key is None:
            continue
        started = time.perf_counter()
        try:
            entries = tier.prepare_load([key])
        except KeyError:  # unreadable: the tier dropped (and counted) it; nothing measured
            continue
        seconds = time.perf_counter() - started
        tier.complete_load([key])
        cost_model.record_load(tier.name, entries[0].num_bytes, seconds)


def _build_tiers(loaded: LoadedModel, layout: ModelLayout, cache_config: CacheConfig, block_size: int) -> tuple[list, list]:
    """(tiers fastest first, their background helpers)."""
    policy = cache_config.eviction_policy
    on_gpu = loaded.device.type != "cpu"
    # torch-side helpers are imported here: the tiers package itself does not need torch
    from kvcellar.tiers.host import payload_mover, pinned_admission
    from kvcellar.tiers.pinned import PinnedReserve

    helpers = []
    device_adopt = payload_mover(loaded.device) if on_gpu else None  # promoted payloads land on the GPU
    tiers = [MemoryTier(cache_config.device_cache_bytes, name="device", policy=policy, adopt=device_adopt)]
    if on_gpu and cache_config.use_host_tier and cache_config.host_cache_bytes > 0:
        reserve = PinnedReserve(cache_config.host_cache_bytes) if loaded.device.type == "cuda" else None
        if reserve is not None:
            helpers.append(reserve)
        host_adopt = payload_mover("cpu", reserve, block_size)
        admit = pinned_admission(reserve, block_size) if reserve is not None else None
        tiers.append(MemoryTier(cache_config.host_cache_bytes, name="host", policy=policy, adopt=host_adopt, admit=admit))
    if cache_config.use_disk_tier and cache_config.cache_dir:
        from kvcellar.tiers.disk import DiskTier
        from kvcellar.tiers.torch_codec import TorchCodec, layout_string

        codec = TorchCodec(layout_string(layout), loaded.device)
        disk = DiskTier(
            cache_config.cache_dir, cache_config.disk_cache_bytes, codec,
            policy=policy, max_queue_bytes=cache_config.disk_write_queue_bytes,
        )  # fmt: skip
        tiers.append(disk)
    return tiers, helpers
