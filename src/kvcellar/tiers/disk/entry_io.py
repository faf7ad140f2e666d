"""Write and read one entry file, checking everything the file says about itself.

Operations: `write_entry` (checksum and atomic write in one pass),
`read_entry` (map, then `verify_entry` of tiers/blob.py), `read_header`
(header only: start-up indexes orphan files with it), `Expected`, `ReadFailure`,
`RowMismatch` (a valid file whose index row is wrong).

The file holds an entry's bytes (tiers/blob.py: checksummed, self-describing).
A file is served only if blob.py's checks pass and its parent, kind and
token count match what the index expects. A file
that fails a check of its own is corrupt (quarantined); a valid file whose
row says otherwise (size, parent, kind, token count) is a RowMismatch: the
row is re-derived from the file, the file kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from kvcellar.cache import CacheEntry
from kvcellar.tiers.blob import tensor_buffers, verify_entry
from kvcellar.tiers.codec import PayloadCodec
from kvcellar.tiers.disk.files import map_file, write_atomic
from kvcellar.tiers.format import (
    EntryHeader,
    FormatError,
    encode_header,
    header_length,
    new_checksum,
    parse_header,
    placeholder_checksum,
)


class ReadFailure(Exception):
    """The file cannot be served. `kind`: missing | corrupt | unreadable | row (see RowMismatch).

    `entry`: for a RowMismatch, the verified entry the file holds (set by the tier), else None.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.entry: CacheEntry | None = None


class RowMismatch(ReadFailure):
    """The file passes every check of its own (format, size, checksum, key hash, layout, key and
    namespace of its place) but the index row disagrees on its size, parent, kind or token count:
    the row is wrong, the file is the truth. Carries what was read."""

    def __init__(self, reason: str, header: EntryHeader, payload: object) -> None:
        super().__init__("row", reason)
        self.header = header
        self.payload = payload


@dataclass(frozen=True)
class Expected:
    """What the index says a file holds."""

    key: bytes
    parent: bytes
    namespace: bytes
    num_bytes: int
    is_tail: bool
    has_logits: bool
    num_tokens: int


def write_entry(
    path: Path, header: EntryHeader, payload: object, codec: PayloadCodec, known_dirs: set[Path],
    pause: Callable[[], None] = lambda: None,
) -> int:  # fmt: skip
    """Write the file atomically in one pass; returns its size (equal to `header.file_size`).

    The header goes first with its checksum digits as zeros (exactly the bytes
    the checksum covers), each tensor is hashed right before it is written
    (still in cache), and the final header overwrites the first one before
    the fsync and rename: no copy of the payload, one read of it.
    `pause()` is called before each tensor and before the fsync: the writer
    thread waits there while a prefill runs, so a file begun between two
    requests stops within one tensor (~0.5 MB) instead of running on through
    the next prefill (the temp file stays invisible meanwhile).
    """
    buffers = tensor_buffers(header, payload, codec)
    algorithm = header.checksum.split(":", 1)[0]
    zeroed = encode_header(replace(header, checksum=placeholder_checksum(algorithm)))
    hasher = new_checksum(algorithm)

    def hashed(chunks: list[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        for chunk in chunks:
            pause()
            hasher.update(chunk)
            yield chunk

    def final_header() -> bytes:  # called once every chunk is written, right before the fsync
        pause()
        head = encode_header(replace(header, checksum=f"{algorithm}:{hasher.hexdigest()}"))
        if len(head) != len(zeroed):  # fixed-width digits: the budget reserved exactly file_size bytes
            raise ValueError(f"entry header would be {len(head)} bytes, {len(zeroed)} were reserved")
        return head

    return write_atomic(path, hashed([zeroed, *buffers]), known_dirs, final_start=final_header)


def read_entry(path: Path, expected: Expected, codec: PayloadCodec) -> tuple[EntryHeader, object]:
    """(header, payload) of a file that passes every check; ReadFailure otherwise."""
    try:
        data = map_file(path)
    except FileNotFoundError:
        raise ReadFailure("missing", "file is gone") from None
    except OSError as exc:
        raise ReadFailure("unreadable", f"cannot read: {exc}") from None
    try:
        header, payload = verify_entry(data, codec, key=expected.key, namespace=expected.namespace)
    except FormatError as exc:
        raise ReadFailure("corrupt", str(exc)) from None
    _check_row(header, len(data), expected, payload)
    return header, payload


def _check_row(header: EntryHeader, size: int, expected: Expected, payload: object) -> None:
    """RowMismatch where the index row describes a verified file otherwise than the file does."""
    problems = [
        (size != expected.num_bytes, f"size {size}, index says {expected.num_bytes}"),
        (header.parent != expected.parent, "parent differs"),
        (header.is_tail != expected.is_tail or header.has_logits != expected.has_logits, "entry kind differs"),
        (len(header.token_ids) != expected.num_tokens, "token count differs"),
    ]
    reasons = [reason for failed, reason in problems if failed]
    if reasons:
        raise RowMismatch("; ".join(reasons), header, payload)


def read_header(path: Path) -> tuple[EntryHeader, int]:
    """(header, file size) reading only the header; FormatError / OSError otherwise."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        head = prefix + handle.read(header_length(prefix))
    header, _ = parse_header(head)
    if header.file_size != size:
        raise FormatError(f"file has {size} bytes, its header describes {header.file_size}")
    return header, size
