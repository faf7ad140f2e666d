"""The cores of one engine, one per tenant salt, over tiers they share; closing them drains queued writes.

Operations: `CacheRegistry.core_for_salt/stats/cores_of/clear/set_budget`,
`.computing()` (around a prefill) and `.serving()` (around a request),
`.flush` (wait for disk writes) and `.close` (drain them within a time bound,
then release every tier and helper: `Engine.close` calls it after the worker
stopped; it returns a `DrainReport`).

All salts share the same tiers (and so one byte budget): keys from different
namespace roots never collide, because the root is hashed into every key.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvcellar.cache.hashing import NamespaceSpec, namespace_digest
from kvcellar.cache.layout import LayoutCapabilities
from kvcellar.cache.observer import CacheObserver, NullObserver
from kvcellar.cache.prefix_cache import PrefixCache
from kvcellar.cache.reuse import EXACT, ReuseRule
from kvcellar.cache.stats import CacheStats
from kvcellar.cache.tier import BackgroundHelper, BackgroundWriter, Tier


@dataclass(frozen=True)
class DrainReport:
    """What closing the cache did with the writes it still held: made durable, or dropped (a miss later)."""

    num_written: int = 0
    num_dropped: int = 0  # still queued when the drain time ran out, or failed while draining
    writing_tiers: tuple[str, ...] = ()  # the tiers that write behind (disk, remote), drained

    @property
    def has_disk_tier(self) -> bool:
        return "disk" in self.writing_tiers


@dataclass
class CacheRegistry:
    """The cores of one engine, one per tenant salt, over shared tiers."""

    spec: NamespaceSpec | None
    capabilities: LayoutCapabilities | None
    tiers: list[Tier] = field(default_factory=list)
    max_tail_entries: int = 0
    uncacheable_reason: str | None = None
    write_through: tuple[str, ...] = ()
    helpers: list[BackgroundHelper] = field(default_factory=list)  # the tiers' helper threads
    observer: CacheObserver = field(default_factory=NullObserver)  # every core's
    reuse: ReuseRule = EXACT  # every salt's core reuses by the same rule (chosen once: cache/reuse.py reuse_rule)
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
                    root, self.capabilities, self.tiers, reuse=self.reuse,
                    max_tail_entries=self.max_tail_entries, observer=self.observer, write_through=self.write_through,
                    lock=self._lock,
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
            self.observer.on_clear(tier_name)

    @contextlib.contextmanager
    def computing(self):
        """Around a prefill: tiers that write in the background (disk) hold their writes back."""
        deferring = [tier for tier in self.tiers if isinstance(tier, BackgroundWriter)]
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
        writing = [tier for tier in self.tiers if isinstance(tier, BackgroundWriter)]
        before = {tier.name: tier.stats().counters for tier in writing}
        for tier in self.tiers:
            tier.flush(left())
        num_written = num_dropped = 0
        for tier in writing:
            after = tier.stats().counters
            num_written += int(after["num_written"] - before[tier.name]["num_written"])
            num_dropped += int(after["num_dropped"] - before[tier.name]["num_dropped"] + after["num_queued"])
            tier.close(left())
        for tier in self.tiers:
            if tier not in writing:
                tier.close()
        for helper in self.helpers:
            helper.close()
        return DrainReport(num_written, num_dropped, tuple(tier.name for tier in writing))

    def set_budget(self, tier_name: str, budget_bytes: int) -> None:
        """Change one tier's budget; evictions go through a core so they are counted."""
        with self._lock:
            core = next(iter(self._cores.values()), None)
            if core is not None:
                core.set_budget_bytes(budget_bytes, tier_name)
            else:
                next(t for t in self.tiers if t.name == tier_name).set_budget(budget_bytes)
