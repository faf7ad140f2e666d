"""The disk tier: one self-describing, checksummed safetensors file per entry, indexed in SQLite.

Modules, in the order a write passes through them:
`tier` (`DiskTier`: the Tier protocol, lookups, loads, stores), `space`
(`DiskSpace`: the budget, a full disk, evictions), `state` (`DiskState`:
what the tier and its writer thread share, behind one lock), `queue` (the
bounded write queue and its thread: pacing, priority), `writer` (what the
thread does with a batch: write, index, delete), `entry_io` (write, read and
verify one file; the bytes are tiers/blob.py's, shared with the remote tier), `files` (paths, atomic writes,
mapped reads, quarantine, the folder lock), `catalog` (the in-memory records,
their `RecordState`, and what the eviction planner reads), `index` (the SQLite summary of the files),
`index_repair` (open the index, set a damaged one aside, audit rows),
`recovery` (start-up: reconcile index and files, prune to the budget),
`admin` (`kvcellar cache stats|ls|clear` without a model),
`thread_priority` (SCHED_IDLE for the writer).

Invariant: the files are the truth; the index is a fast summary of them.
"""

from kvcellar.tiers.disk.admin import clear_disk_cache, disk_cache_stats, list_disk_entries
from kvcellar.tiers.disk.tier import DiskTier

__all__ = ["DiskTier", "clear_disk_cache", "disk_cache_stats", "list_disk_entries"]
