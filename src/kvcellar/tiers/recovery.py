"""Start-up of a disk cache directory: reconcile the index with the files, then enforce the budget.

Operations: `recover(cache_dir, index, catalog, budget_bytes) -> dict` (what
was repaired, for stats and logs).

Reads the index (small rows, no token ids) and lists the entry folders; it
opens no entry file except orphans, whose header it reads. So a restart over
100k entries costs one SQLite scan and one directory walk.
- temp files (a write that never finished) are deleted;
- rows whose file is missing (or sits under another namespace folder) are dropped;
- orphan files (renamed, but the process died before the index commit)
  are indexed from their header, or deleted if the header is not valid;
- stray files in the entry folders (not ours) are deleted;
- then, if the directory holds more than the budget (a smaller
  --disk-cache-size, or files copied in), leaves are pruned in eviction
  order until it fits, before the tier serves anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kvcellar.tiers.catalog import Catalog, Record
from kvcellar.tiers.entry_io import read_header
from kvcellar.tiers.files import CacheDir, scan_entries
from kvcellar.tiers.format import FormatError
from kvcellar.tiers.index import DiskIndex, IndexRow

log = logging.getLogger(__name__)


def record_from_row(row: IndexRow) -> Record:
    return Record(row.key, row.parent, row.namespace, row.num_bytes, row.payload_bytes, row.priority, row.last_used,
                  row.num_tokens, row.is_partial, row.has_logits)  # fmt: skip


def recover(cache_dir: CacheDir, index: DiskIndex, catalog: Catalog, budget_bytes: int) -> dict[str, int]:
    report = dict.fromkeys(
        ("num_temp_removed", "num_strays_removed", "num_missing_dropped", "num_orphans_indexed", "num_orphans_removed",
         "num_pruned_at_open"), 0,
    )  # fmt: skip
    found, temps, strays = scan_entries(cache_dir)
    for path in temps + strays:
        path.unlink(missing_ok=True)
    report["num_temp_removed"], report["num_strays_removed"] = len(temps), len(strays)

    missing = []
    for row in index.rows():
        located = found.get(row.key)
        if located is None or located[0] != row.namespace.hex()[:16]:
            missing.append(row.key)  # a file under the wrong namespace folder stays an orphan below
            continue
        del found[row.key]
        catalog.add(record_from_row(row))
    index.delete(missing)
    report["num_missing_dropped"] = len(missing)

    orphans = []
    for key, (ns_prefix, name) in found.items():
        path = Path(name)
        try:
            header, size = read_header(path)
            if header.key != key or header.namespace.hex()[:16] != ns_prefix:
                raise FormatError("header does not match the file's place")
        except (OSError, FormatError):
            path.unlink(missing_ok=True)
            report["num_orphans_removed"] += 1
            continue
        row = IndexRow(key, header.parent, header.namespace, size, header.payload_bytes, header.priority, 0,
                       len(header.token_ids), header.is_partial, header.has_logits)  # fmt: skip
        orphans.append((row, header.token_ids))
        catalog.add(record_from_row(row))  # last_used 0: the oldest, pruned first if over budget
    index.put(orphans)
    report["num_orphans_indexed"] = len(orphans)

    victims = catalog.plan_evictions(catalog.num_bytes - budget_bytes, None) or []
    for record in victims:
        catalog.remove(record)
        cache_dir.entry_path(record.namespace, record.key).unlink(missing_ok=True)  # file first, then row
    index.delete([record.key for record in victims])
    index.commit()
    report["num_pruned_at_open"] = len(victims)
    if any(report.values()):
        log.info("disk cache %s recovered: %s", cache_dir.root, {k: v for k, v in report.items() if v})
    return report
