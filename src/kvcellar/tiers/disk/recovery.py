"""Start-up of a disk cache directory: reconcile the index with the files, then enforce the budget.

Operations: `recover(cache_dir, catalog, budget_bytes) -> (DiskIndex, dict)`
(the open index, and what was repaired, for stats and logs).

Reads the index (small rows; of the token ids only their lengths) and lists
the entry folders; it opens no entry file except orphans, whose header it
reads. So a restart over 100k entries costs one SQLite scan and one
directory walk.
- a damaged index is set aside and rebuilt: every file is then an orphan
  (index_repair.py; `num_index_rebuilt`);
- rows with a value that cannot be used (index.row_problem, token ids
  missing or of the wrong length) are dropped (`num_bad_rows_at_open`), and
  their files become orphans;
- temp files (a write that never finished) are deleted;
- rows whose file is missing (or sits under another namespace folder) are dropped;
- orphan files (renamed, but the process died before the index commit)
  are indexed from their header, or quarantined if the header is not valid
  (deleted if it cannot be read);
- stray files in the entry folders (not ours) are deleted;
- then, if the directory holds more than the budget (a smaller
  --disk-cache-size, or files copied in), leaves are pruned in eviction
  order until it fits, before the tier serves anything (no budget: no pruning,
  for `kvcellar cache` repairing a folder).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kvcellar.tiers.disk.catalog import Catalog, Record
from kvcellar.tiers.disk.state import files_share
from kvcellar.tiers.disk.entry_io import read_header
from kvcellar.tiers.disk.files import CacheDir, quarantine, scan_entries
from kvcellar.tiers.format import FormatError
from kvcellar.tiers.disk.index import DiskIndex, IndexRow
from kvcellar.tiers.disk.index_repair import open_index

log = logging.getLogger(__name__)


def record_from_row(row: IndexRow) -> Record:
    return Record(row.key, row.parent, row.namespace, row.num_bytes, row.payload_bytes, row.priority, row.last_used,
                  row.num_tokens, row.is_tail, row.has_logits)  # fmt: skip


def recover(cache_dir: CacheDir, catalog: Catalog, budget_bytes: int | None) -> tuple[DiskIndex, dict[str, int]]:
    """Open the index (rebuilt if damaged) and make it, the files and `catalog` agree; the caller holds the lock."""
    opened = open_index(cache_dir)
    try:
        report = dict.fromkeys(
            ("num_index_rebuilt", "num_bad_rows_at_open", "num_temp_removed", "num_strays_removed",
             "num_missing_dropped", "num_orphans_indexed", "num_orphans_removed", "num_pruned_at_open"), 0,
        )  # fmt: skip
        report["num_index_rebuilt"], report["num_bad_rows_at_open"] = int(opened.rebuilt), len(opened.bad_keys)
        opened.index.delete(opened.bad_keys)  # their files are orphans below: indexed again from their headers
        opened.index.delete_stray_tokens()
        found = _remove_temps_and_strays(cache_dir, report)
        _add_rows(opened.index, opened.rows, found, catalog, report)
        _index_orphans(cache_dir, opened.index, found, catalog, report)
        if budget_bytes is not None:  # the budget covers the index too, and the WAL's room to grow (state.py)
            _prune(cache_dir, opened.index, catalog, files_share(budget_bytes, opened.index.size_bytes()), report)
        opened.index.commit()
    except BaseException:
        opened.index.close()
        raise
    if any(report.values()):
        damaged = report["num_index_rebuilt"] or report["num_bad_rows_at_open"] or report["num_orphans_removed"]
        log.log(logging.WARNING if damaged else logging.INFO, "disk cache %s recovered: %s", cache_dir.root,
                {k: v for k, v in report.items() if v})  # fmt: skip
    return opened.index, report


def _remove_temps_and_strays(cache_dir: CacheDir, report: dict[str, int]) -> dict[bytes, tuple[str, str]]:
    found, temps, strays = scan_entries(cache_dir)
    for path in temps + strays:
        path.unlink(missing_ok=True)
    report["num_temp_removed"], report["num_strays_removed"] = len(temps), len(strays)
    return found


def _add_rows(index: DiskIndex, rows: list[IndexRow], found: dict, catalog: Catalog, report: dict[str, int]) -> None:
    """Rows with their file go into the catalog (their keys leave `found`); rows without are deleted."""
    missing = []
    for row in rows:
        located = found.get(row.key)
        if located is None or located[0] != row.namespace.hex()[:16]:
            missing.append(row.key)  # a file under the wrong namespace folder stays an orphan below
            continue
        del found[row.key]
        catalog.add(record_from_row(row))
    index.delete(missing)
    report["num_missing_dropped"] = len(missing)


def _index_orphans(cache_dir: CacheDir, index: DiskIndex, found: dict, catalog: Catalog, report: dict[str, int]) -> None:
    """Files no row names: indexed from their header; quarantined if it is not valid, deleted if unreadable."""
    orphans = []
    for key, (ns_prefix, name) in found.items():
        path = Path(name)
        try:
            header, size = read_header(path)
            if header.key != key or header.namespace.hex()[:16] != ns_prefix:
                raise FormatError("header does not match the file's place")
        except FormatError as exc:
            quarantine(cache_dir, path, str(exc))
            report["num_orphans_removed"] += 1
            continue
        except OSError:
            path.unlink(missing_ok=True)
            report["num_orphans_removed"] += 1
            continue
        row = IndexRow(key, header.parent, header.namespace, size, header.payload_bytes, header.priority, 0,
                       len(header.token_ids), header.is_tail, header.has_logits)  # fmt: skip
        orphans.append((row, header.token_ids))
        catalog.add(record_from_row(row))  # last_used 0: the oldest, pruned first if over budget
    index.put(orphans)
    report["num_orphans_indexed"] = len(orphans)


def _prune(cache_dir: CacheDir, index: DiskIndex, catalog: Catalog, budget_bytes: int, report: dict[str, int]) -> None:
    victims = catalog.plan_evictions(catalog.num_bytes - budget_bytes, None) or []
    for record in victims:
        catalog.remove(record)
        cache_dir.entry_path(record.namespace, record.key).unlink(missing_ok=True)  # file first, then row
    index.delete([record.key for record in victims])
    report["num_pruned_at_open"] = len(victims)
