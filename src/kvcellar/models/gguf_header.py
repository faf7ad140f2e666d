"""Read a GGUF file's header: its scalar and string metadata, and each tensor's element count.

Operation: `read_header(file)` -> `GgufHeader` (`metadata`, `tensor_elements`, `.architecture`,
`.num_parameters`).

Why not `gguf.GGUFReader`: it builds numpy views of every field, which for a large vocabulary costs
seconds on every start. This reads the same layout (GGUF v2/v3, little-endian: magic, version,
tensor count, metadata count, key/value pairs, tensor infos) with `struct` over an mmap, keeping
scalars and strings and stepping over arrays (the vocabulary, merges, token types) without
decoding them, so its cost does not grow with the vocabulary's arrays.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from kvcellar.errors import ModelLoadError

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# Value type -> struct format of one scalar (bool is one byte).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GgufHeader:
    metadata: dict[str, object]  # scalars and strings; an array's key maps to its length
    tensor_elements: dict[str, int]  # tensor name -> number of elements

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def num_parameters(self) -> int:
        return sum(self.tensor_elements.values())


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> object:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.data[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def skip_string(self) -> None:
        length = self.unpack("<Q")  # first: `self.pos += self.unpack(...)` would add to the position before the read
        self.pos += length

    def value(self, kind: int) -> object:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[item_kind])
            else:
                for _ in range(count):
                    if item_kind == _ARRAY:
                        self.value(_ARRAY)
                    else:
                        self.skip_string()
            return count
        raise ValueError(f"unknown metadata value type {kind} at byte {self.pos}")


def read_header(file: Path) -> GgufHeader:
    """The header of `file`, or ModelLoadError if it is not a readable GGUF file."""
    try:
        with file.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != _MAGIC:
                raise ValueError(f"it starts with {bytes(data[:4])!r}, not {_MAGIC!r}")
            cursor = _Cursor(data)
            cursor.pos = 4
            version = cursor.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (this reader knows 2 and 3)")
            num_tensors, num_fields = cursor.unpack("<Q"), cursor.unpack("<Q")
            metadata = {}
            for _ in range(num_fields):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.unpack("<I"))
            elements = {}
            for _ in range(num_tensors):
                name = cursor.string()
                dims = struct.unpack_from(f"<{cursor.unpack('<I')}Q", data, cursor.pos)
                cursor.pos += 8 * len(dims) + 12  # the dimensions, then the type (u32) and data offset (u64)
                count = 1
                for size in dims:
                    count *= size
                elements[name] = count
    except (OSError, ValueError, struct.error, IndexError, OverflowError) as exc:
        raise ModelLoadError(f"{str(file)!r} is not a readable GGUF file ({exc})") from exc
    return GgufHeader(metadata, elements)
