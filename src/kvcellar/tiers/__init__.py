"""Every storage medium, each in one place; each implements the `Tier` protocol (cache/tier.py).

Modules: `memory` (`MemoryTier`: the `device` tier, and the `host` tier in
pinned RAM beside a GPU, whose tensor hooks live in kv/pinned.py) and the
`disk` package (one checksummed safetensors file per entry, a SQLite index,
a background writer).

Nothing here imports torch: payloads are opaque, and the disk tier turns
them into bytes through the `PayloadCodec` it is given (kv/torch_codec.py
for the engine's tensors).
"""
