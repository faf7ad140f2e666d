"""Every storage medium, each in one place; each implements the `Tier` protocol (cache/tier.py).

Modules: `memory` (`MemoryTier`: the `device` tier, and the `host` tier in
pinned RAM beside a GPU, whose tensor hooks live in kv/pinned.py), the
`disk` package (one checksummed safetensors file per entry, a SQLite index,
a background writer), the `remote` package (a Redis/Valkey shared by several
servers), and what the last two share: an entry as bytes (`format`: the
header; `codec`: payload <-> tensors as bytes; `blob`: encode and verify).

Nothing here imports torch: payloads are opaque, and the persistent tiers turn
them into bytes through the `PayloadCodec` they are given (kv/torch_codec.py
for the engine's tensors).
"""
