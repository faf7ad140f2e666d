"""Tier implementations that touch files or tensors; the protocol and the memory tier are in `kvcellar.cache`.

Modules: `disk` (`DiskTier`: one safetensors file per entry, SQLite index,
background writer; `disk_cache_stats` / `list_disk_entries` /
`clear_disk_cache` for the CLI), `disk_state` (what the tier and its
writer thread share), `disk_writer` (the writer thread's side), `format`
(the entry file), `entry_io`
(write, read and verify one file), `files` (paths, atomic writes, mapped
reads, quarantine, directory lock), `index` (SQLite), `catalog` (in-memory
records and eviction order), `writer` (the bounded write queue and its
thread), `recovery` (start-up reconcile and budget), `index_repair`
(open the index, set a damaged one aside, audit rows), `admin` (no-model
tools), `codec` (`PayloadCodec`, `RawCodec`), `torch_codec` (`TorchCodec`
for the engine's `StatePayload`), `host` (payload moves for the host tier).

Only `torch_codec` and `host` import torch, lazily by their users: the disk
tier itself, and the admin tools, run without it.
"""
