"""`kvcellar cache stats|ls|clear` functions: no model, no torch, exact figures."""

from __future__ import annotations

import pytest

from kvcellar.tiers.disk.tier import clear_disk_cache, disk_cache_stats, list_disk_entries
from kvcellar.tiers.disk.files import CacheDirError

from .helpers import ROOT_A, ROOT_B, chain, entry_files, make_partial, open_tier, store


@pytest.fixture
def folder(tmp_path):
    tier = open_tier(tmp_path / "kv")
    for entry in chain(range(12)) + chain(range(8), root=ROOT_B) + [make_partial(ROOT_A, [5])]:
        store(tier, entry)
    tier.touch([chain(range(4))[0].key])  # the first block of namespace A becomes the most recent
    tier.close()
    return tmp_path / "kv"


def test_stats_without_a_model(folder):
    stats = disk_cache_stats(folder)
    files = entry_files(folder)
    assert stats["num_entries"] == 6 == len(files) and stats["num_partial_entries"] == 1
    assert stats["num_bytes"] == sum(p.stat().st_size for p in files)
    assert stats["num_tokens"] == 12 + 8 + 1
    assert stats["namespaces"] == {
        ROOT_A.hex()[:16]: {"entries": 4, "bytes": stats["namespaces"][ROOT_A.hex()[:16]]["bytes"], "tokens": 13},
        ROOT_B.hex()[:16]: {"entries": 2, "bytes": stats["namespaces"][ROOT_B.hex()[:16]]["bytes"], "tokens": 8},
    }
    assert stats["by_priority"]["USER"]["entries"] == 6 and not stats["in_use"]
    assert stats["index_bytes"] > 0 and stats["num_quarantined"] == 0


def test_ls_lists_the_most_recent_first(folder):
    entries = list_disk_entries(folder, limit=3)
    assert len(entries) == 3 and entries[0]["key"] == chain(range(4))[0].key.hex()
    assert [e["last_used"] for e in entries] == sorted((e["last_used"] for e in entries), reverse=True)
    assert entries[0]["num_tokens"] == 4 and entries[0]["priority"] == "USER" and entries[0]["path"].endswith(".safetensors")
    assert len(list_disk_entries(folder, limit=100)) == 6


def test_clear_one_namespace_then_all(folder):
    assert clear_disk_cache(folder, namespace=ROOT_B.hex()[:8]) == 2
    assert disk_cache_stats(folder)["namespaces"].keys() == {ROOT_A.hex()[:16]}
    assert len(entry_files(folder)) == 4
    assert clear_disk_cache(folder) == 4
    assert disk_cache_stats(folder)["num_entries"] == 0 and entry_files(folder) == []
    tier = open_tier(folder)  # a cleared directory opens clean
    assert tier.num_entries == 0 and tier.stats().counters["num_orphans_indexed"] == 0
    tier.close()


def test_clear_refuses_while_the_cache_is_open(folder):
    tier = open_tier(folder)
    assert disk_cache_stats(folder)["in_use"]
    with pytest.raises(CacheDirError, match="in use"):
        clear_disk_cache(folder)
    tier.close()
    with pytest.raises(ValueError, match="hex digits"):
        clear_disk_cache(folder, namespace="zz")


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path):
    with pytest.raises(CacheDirError, match="not a kvcellar cache"):
        disk_cache_stats(tmp_path)
    with pytest.raises(CacheDirError):
        clear_disk_cache(tmp_path)
