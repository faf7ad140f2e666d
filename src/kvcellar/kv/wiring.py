"""Wire a loaded model to its prefix cache: namespace, tiers, one core per tenant salt.

Operations: `build_prefix_cache(model_config, layout, device, precision, fingerprint,
config) -> (prefix cache, CacheRegistry)`, `prime_load_rates`. The namespace's
reuse rule (exact or near, cache/reuse.py) is chosen here, once, and every
tenant salt's core is built with it.

Tiers, fastest first: `device` (MemoryTier); `host` (MemoryTier in pinned RAM,
only when the model runs on a GPU; kv/pinned.py supplies its hooks); `disk`
(DiskTier, only with a cache_dir), which also receives every inserted entry
(write-through, on its background thread) so a restart finds what was
computed even if nothing was evicted; `remote` (RemoteTier, only with a
remote_cache URL), written through the same way so other servers find it.
An exact namespace names where it computes (`compute_identity`). With a
kv_events_endpoint, stores, evictions and clears are also published as
vLLM-format KV events (kvcellar/events). Every core reports its events to a
`LoggingObserver` on the "kvcellar.cache" logger (refusals and evictions at
DEBUG).
"""

from __future__ import annotations

import logging
import time

import torch

from kvcellar.cache import BlockHash, NamespaceSpec, namespace_digest
from kvcellar.cache.registry import CacheRegistry
from kvcellar.cache.cost_model import CostModel
from kvcellar.cache.observer import CacheObserver, LoggingObserver, ObserverGroup
from kvcellar.cache.tier import BackgroundHelper, PersistentTier, Tier
from kvcellar.cache.reuse import reuse_rule
from kvcellar.config import ROW_INVARIANT_MIN_ROWS, CacheConfig, EngineConfig
from kvcellar.events.observer import KVEventObserver
from kvcellar.events.publisher import EventPublisher
from kvcellar.kv.adapter import DisabledPrefixCache, ModelPrefixCache
from kvcellar.kv.layout import LAYOUT_VERSION, ModelLayout
from kvcellar.kv.pinned import PinnedReserve, payload_mover, pinned_admission
from kvcellar.kv.torch_codec import TorchCodec, layout_string
from kvcellar.tiers.disk.tier import DiskTier
from kvcellar.tiers.memory import MemoryTier
from kvcellar.tiers.remote.tier import RemoteTier


def build_prefix_cache(
    model_config: object, layout: ModelLayout, device: torch.device, precision: str, fingerprint: str,
    config: EngineConfig,
) -> tuple[ModelPrefixCache | DisabledPrefixCache, CacheRegistry]:
    """The engine's prefix cache for a model (its transformers config and layer kinds (`inspect_layout`),
    where it runs, its dtype as `LoadedModel.precision` names it, its weights' fingerprint);
    `config.prefill_chunk_size` as the engine resolved it."""
    cache_config = config.cache
    if not cache_config.enabled or not layout.is_cacheable:
        reason = "disabled by configuration" if not cache_config.enabled else layout.uncacheable_reason
        return DisabledPrefixCache(model_config), CacheRegistry(None, None, uncacheable_reason=reason)
    chunk = config.prefill_chunk_size or config.block_size
    row_invariant = config.prefill_schedule == "row-invariant"  # as the engine resolved it
    spec = NamespaceSpec(
        model_fingerprint=fingerprint,
        dtype=precision,  # stored logits round as the weights do (engine/weights.py): their own namespace
        block_size=config.block_size,
        layout_version=LAYOUT_VERSION,
        exact=cache_config.exact,
        tenant_salt=cache_config.tenant_salt,
        chunk_size=chunk if chunk > config.block_size else None,  # None keeps the digests of one-block chunks
        schedule="row-invariant" if row_invariant else None,
        compute=compute_identity(device) if cache_config.exact else None,
    )
    capabilities = layout.capabilities(config.block_size)
    reuse = reuse_rule(cache_config.exact, capabilities, chunk, ROW_INVARIANT_MIN_ROWS if row_invariant else None)
    tiers, helpers = _build_tiers(device, layout, cache_config, config.block_size)
    write_through = tuple(tier.name for tier in tiers if tier.name in ("disk", "remote"))
    observer: CacheObserver = LoggingObserver(logging.getLogger("kvcellar.cache"))
    if cache_config.kv_events_endpoint:
        publisher = EventPublisher(cache_config.kv_events_endpoint)
        helpers.append(publisher)  # closed with the cache, after its last events
        observer = ObserverGroup(observer, KVEventObserver(publisher, config.block_size, device.type))
    registry = CacheRegistry(
        spec, capabilities, tiers, cache_config.max_partial_entries, write_through=write_through, helpers=helpers,
        reuse=reuse, observer=observer,
    )  # fmt: skip
    prefix_cache = ModelPrefixCache(
        registry.core_for_salt, model_config, layout, config.block_size, reuse, device,
        computing=registry.computing, serving=registry.serving, weigh_restores=cache_config.cost_model,
    )
    prime_load_rates(tiers, prefix_cache.cost_model, namespace_digest(spec))  # the default salt's namespace
    return prefix_cache, registry


def compute_identity(device: torch.device) -> str:
    """Where K/V are computed, as far as it decides their rounding: device kind, kernel level, torch version.

    Exact entries are bit-identical to a cold prefill only on hardware that rounds the same way, so an
    exact namespace names it: a shared tier then never hands one machine's exact entries to another kind.
    """
    version = torch.__version__.split("+")[0]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        level = f"sm{major}{minor}"
    elif device.type == "cpu":
        level = torch.backends.cpu.get_cpu_capability().lower()
    else:
        level = device.type
    return f"{device.type}:{level}:torch{version}"


def prime_load_rates(tiers: list[Tier], cost_model: CostModel, namespace: BlockHash) -> None:
    """Time one stored block of `namespace` loading from each tier that persists across restarts (`PersistentTier`).

    Without it, a process started on a full cache folder loads its first hits whatever they cost, to
    find out, even where recomputing is several times faster (a small model on a fast GPU,
    docs/benchmarks.md). The cost model then weighs the first hits against a measured rate.
    """
    for tier in tiers:
        key = tier.sample_key(namespace) if isinstance(tier, PersistentTier) else None
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


def _build_tiers(device: torch.device, layout: ModelLayout, cache_config: CacheConfig, block_size: int) -> tuple[list[Tier], list[BackgroundHelper]]:
    """(tiers fastest first, their background helpers)."""
    policy = cache_config.eviction_policy
    on_gpu = device.type != "cpu"

    helpers: list[BackgroundHelper] = []
    device_adopt = payload_mover(device) if on_gpu else None  # promoted payloads land on the GPU
    tiers: list[Tier] = [MemoryTier(cache_config.device_cache_bytes, name="device", policy=policy, adopt=device_adopt)]
    if on_gpu and cache_config.use_host_tier and cache_config.host_cache_bytes > 0:
        reserve = PinnedReserve(cache_config.host_cache_bytes) if device.type == "cuda" else None
        if reserve is not None:
            helpers.append(reserve)
        host_adopt = payload_mover("cpu", reserve, block_size)
        admit = pinned_admission(reserve, block_size) if reserve is not None else None
        tiers.append(MemoryTier(cache_config.host_cache_bytes, name="host", policy=policy, adopt=host_adopt, admit=admit))
    if cache_config.use_disk_tier and cache_config.cache_dir:
        codec = TorchCodec(layout_string(layout), device)
        disk = DiskTier(
            cache_config.cache_dir, cache_config.disk_cache_bytes, codec,
            policy=policy, max_queue_bytes=cache_config.disk_write_queue_bytes,
        )  # fmt: skip
        tiers.append(disk)
    if cache_config.remote_cache:
        tiers.append(RemoteTier(
            cache_config.remote_cache, TorchCodec(layout_string(layout), device), prefix=cache_config.remote_key_prefix,
            timeout_s=cache_config.remote_timeout_s, max_queue_bytes=cache_config.remote_write_queue_bytes,
        ))  # fmt: skip
    return tiers, helpers
