"""The entry file: a safetensors file whose header describes the cache entry it holds.

Operations: `TensorSpec`, `EntryHeader` (what a file says about itself),
`encode_header` / `EntryHeader.file_size`, `parse_header`, `new_checksum`
(streaming checksum of the tensor bytes), `FormatError`.

Layout (standard safetensors, readable by `safetensors.safe_open`):
  8 bytes   little-endian u64 N, the JSON header length (N % 8 == 0, space padded)
  N bytes   JSON {"__metadata__": {...}, "<tensor>": {"dtype", "shape", "data_offsets"}, ...}
  data      the tensors, back to back in header order, no holes
Metadata (all strings, as safetensors requires): format, format_version, key,
parent, namespace (hex digests), token_ids (decimal, comma separated),
is_partial, has_logits ("0"/"1"), priority, layout (the codec's layer layout),
payload_bytes, checksum ("<algorithm>:<hex>" over the data section).
The format's names are fixed: its "is_partial" is what the code calls a
tail (`EntryHeader.is_tail`); renaming it would orphan every existing file.

Tensors are laid out by decreasing item size so every tensor starts at a
multiple of its item size (the data section starts 8-aligned): they can be
viewed in place, without copying. The checksum has a fixed width per
algorithm, so the file size is known before the checksum is computed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from kvcellar.cache import Priority
from kvcellar.cache.hashing import HASH_NUM_BYTES

try:  # xxh3, several times faster than sha256 on one core: the checksum covers every byte a load reads
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

FORMAT = "kvcellar-entry"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 16 << 20  # a header past this is corrupt, never parsed
ITEM_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
              "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_HEX_WIDTH = {"xxh3_128": 32, "sha256": 64}
DEFAULT_CHECKSUM = "xxh3_128" if xxhash is not None else "sha256"
PRIORITY_VALUES = frozenset(int(p) for p in Priority)  # what a header or an index row may hold


class FormatError(ValueError):
    """The bytes are not a valid entry file (truncated, corrupt, or another format)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype name: BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * ITEM_SIZES[self.dtype]


@dataclass(frozen=True)
class EntryHeader:
    key: bytes
    parent: bytes
    namespace: bytes
    token_ids: tuple[int, ...]
    is_tail: bool
    has_logits: bool
    priority: int
    layout: str
    tensors: tuple[TensorSpec, ...]  # in file order (see `ordered`)
    checksum: str  # "<algorithm>:<hex>"; a zero digest of the right width before it is computed

    @property
    def payload_bytes(self) -> int:
        return sum(spec.num_bytes for spec in self.tensors)

    @property
    def file_size(self) -> int:
        return len(encode_header(self)) + self.payload_bytes


def ordered(specs: list[TensorSpec]) -> tuple[TensorSpec, ...]:
    """File order: larger item sizes first (alignment), then by name (determinism)."""
    return tuple(sorted(specs, key=lambda spec: (-ITEM_SIZES[spec.dtype], spec.name)))


def placeholder_checksum(algorithm: str = DEFAULT_CHECKSUM) -> str:
    return f"{algorithm}:{'0' * _HEX_WIDTH[algorithm]}"


def new_checksum(algorithm: str):
    """A hasher with update()/hexdigest(); ValueError for an algorithm this process cannot compute."""
    if algorithm == "xxh3_128" and xxhash is not None:
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"checksum algorithm {algorithm!r} is not available here (pip install xxhash)")


def encode_header(header: EntryHeader) -> bytes:
    """The 8-byte length prefix and the padded JSON header."""
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": header.key.hex(),
        "parent": header.parent.hex(),
        "namespace": header.namespace.hex(),
        "token_ids": ",".join(map(str, header.token_ids)),
        "is_partial": "1" if header.is_tail else "0",
        "has_logits": "1" if header.has_logits else "0",
        "priority": str(int(header.priority)),
        "layout": header.layout,
        "payload_bytes": str(header.payload_bytes),
        "checksum": header.checksum,
    }
    document: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in header.tensors:
        document[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.num_bytes]}
        offset += spec.num_bytes
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def header_length(prefix: bytes) -> int:
    """N from the first 8 bytes, checked against MAX_HEADER_BYTES."""
    if len(prefix) < 8:
        raise FormatError("file shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or length % 8:
        raise FormatError(f"implausible header length {length}")
    return length


def _check_fields(header: EntryHeader) -> None:
    """Values the index and the catalog rely on: 32-byte digests, a known priority, u32 token ids."""
    if any(len(digest) != HASH_NUM_BYTES for digest in (header.key, header.parent, header.namespace)):
        raise FormatError(f"key, parent and namespace must be {HASH_NUM_BYTES}-byte digests")
    if header.priority not in PRIORITY_VALUES:
        raise FormatError(f"unknown priority {header.priority}")
    if any(not 0 <= token < 1 << 32 for token in header.token_ids):
        raise FormatError("a token id is outside 0..2**32-1")


def parse_header(data: bytes | memoryview) -> tuple[EntryHeader, int]:
    """(header, offset of the data section) from a buffer holding at least the whole header."""
    length = header_length(bytes(data[:8]))
    if len(data) < 8 + length:
        raise FormatError("file truncated inside its header")
    try:
        document = json.loads(bytes(data[8 : 8 + length]))
        meta = document.pop("__metadata__")
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"not a {FORMAT} v{FORMAT_VERSION} file")
        tensors, expected_offset = [], 0
        for name, info in sorted(document.items(), key=lambda item: item[1]["data_offsets"][0]):
            spec = TensorSpec(name, info["dtype"], tuple(int(d) for d in info["shape"]))
            begin, end = info["data_offsets"]
            if begin != expected_offset or end - begin != spec.num_bytes:
                raise FormatError(f"tensor {name!r} does not follow the previous one")
            expected_offset = end
            tensors.append(spec)
        tokens = meta["token_ids"]
        header = EntryHeader(
            key=bytes.fromhex(meta["key"]),
            parent=bytes.fromhex(meta["parent"]),
            namespace=bytes.fromhex(meta["namespace"]),
            token_ids=tuple(int(t) for t in tokens.split(",")) if tokens else (),
            is_tail=meta["is_partial"] == "1",
            has_logits=meta["has_logits"] == "1",
            priority=int(meta["priority"]),
            layout=meta["layout"],
            tensors=tuple(tensors),
            checksum=meta["checksum"],
        )
        if int(meta["payload_bytes"]) != header.payload_bytes:
            raise FormatError("payload_bytes disagrees with the tensor table")
        _check_fields(header)
    except FormatError:
        raise
    except RecursionError:  # deeply nested JSON ("[[[[..."): json.loads recurses once per level
        raise FormatError("unreadable header: nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise FormatError(f"unreadable header: {exc!r:.200}") from None
    return header, 8 + length
