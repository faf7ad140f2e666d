"""Write and read one entry file, checking everything the file says about itself.

Operations: `plan_header` (the header of an entry, exact file size known
before any tensor byte is touched), `write_entry` (checksum and atomic
write in one pass), `read_entry` (map, parse, validate, checksum, decode), `read_header`
(header only: start-up indexes orphan files with it), `Expected`, `ReadFailure`,
`RowMismatch` (a valid file whose index row is wrong).

The checksum covers the whole file, the checksum's own hex digits read as
zeros: a flipped bit anywhere (header or tensors) is caught. A file is
served only if its size, format, key, namespace, parent, kind, layout and
`key == hash(parent, token_ids)` all match what the index expects. A file
that fails a check of its own is corrupt (quarantined); a valid file whose
row says otherwise (size, parent, kind, token count) is a RowMismatch: the
row is re-derived from the file, the file kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from kvcellar.cache import CacheEntry, hash_block, hash_tail
from kvcellar.tiers.disk.codec import PayloadCodec
from kvcellar.tiers.disk.files import map_file, write_atomic
from kvcellar.tiers.disk.format import (
    DEFAULT_CHECKSUM,
    EntryHeader,
    FormatError,
    encode_header,
    header_length,
    new_checksum,
    ordered,
    parse_header,
    placeholder_checksum,
)

_CHECKSUM_FIELD = b'"checksum":"'


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


def plan_header(entry: CacheEntry, codec: PayloadCodec, algorithm: str = DEFAULT_CHECKSUM) -> EntryHeader:
    """The header `entry` will be written with (placeholder checksum); ValueError if not storable."""
    if entry.namespace is None:
        raise ValueError("an entry needs its namespace to be stored on disk")
    return EntryHeader(
        key=entry.key,
        parent=entry.parent,
        namespace=entry.namespace,
        token_ids=entry.token_ids,
        is_tail=entry.is_tail,
        has_logits=entry.has_logits,
        priority=int(entry.priority),
        layout=codec.layout,
        tensors=ordered(codec.describe(entry.payload)),
        checksum=placeholder_checksum(algorithm),
    )


def _checksum_span(head: bytes | memoryview) -> tuple[int, int]:
    """(start, end) of the checksum's hex digits inside the encoded header."""
    start = bytes(head).find(_CHECKSUM_FIELD)
    if start < 0:
        raise FormatError("no checksum field")
    start = bytes(head).index(b":", start + len(_CHECKSUM_FIELD)) + 1
    end = bytes(head).index(b'"', start)
    return start, end


def _digest(algorithm: str, head: bytes, body: list[memoryview] | memoryview) -> str:
    start, end = _checksum_span(head)
    hasher = new_checksum(algorithm)
    hasher.update(head[:start] + b"0" * (end - start) + head[end:])
    for chunk in body if isinstance(body, list) else [body]:
        hasher.update(chunk)
    return hasher.hexdigest()


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
    buffers = codec.tensor_bytes(payload, header.tensors)
    for spec, buffer in zip(header.tensors, buffers):
        if buffer.nbytes != spec.num_bytes:
            raise ValueError(f"tensor {spec.name!r} has {buffer.nbytes} bytes, its spec says {spec.num_bytes}")
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


def _check(header: EntryHeader, size: int, expected: Expected, layout: str) -> None:
    """FormatError unless the file is consistent in itself and is the entry its place names."""
    problems = [
        (size != header.file_size, f"file has {size} bytes, its header describes {header.file_size}"),
        (header.key != expected.key, "key differs from the file name"),
        (header.namespace != expected.namespace, "namespace differs"),
        (header.layout != layout, f"layer layout {header.layout!r} is not this model's {layout!r}"),
    ]
    for failed, reason in problems:
        if failed:
            raise FormatError(reason)
    if header.is_tail:
        keys = {hash_tail(header.parent, header.token_ids)}
    else:  # a block's key is plain or "stepped" (prefilled after its prompt's last whole chunk: cache/hashing.py)
        keys = {hash_block(header.parent, header.token_ids, stepped) for stepped in (False, True)}
    if header.key not in keys:
        raise FormatError("key is not the hash of parent and token ids")


def read_entry(path: Path, expected: Expected, codec: PayloadCodec) -> tuple[EntryHeader, object]:
    """(header, payload) of a file that passes every check; ReadFailure otherwise."""
    try:
        data = map_file(path)
    except FileNotFoundError:
        raise ReadFailure("missing", "file is gone") from None
    except OSError as exc:
        raise ReadFailure("unreadable", f"cannot read: {exc}") from None
    try:
        header, offset = parse_header(data)
        _check(header, len(data), expected, codec.layout)
        algorithm, _, stored = header.checksum.partition(":")
        try:
            actual = _digest(algorithm, bytes(data[:offset]), data[offset:])
        except ValueError as exc:  # an algorithm this process lacks: unverifiable, so never served
            raise FormatError(str(exc)) from None
        if actual != stored:
            raise FormatError("checksum mismatch")
        buffers, position = [], offset
        for spec in header.tensors:
            buffers.append(data[position : position + spec.num_bytes])
            position += spec.num_bytes
        try:
            payload = codec.decode(header, buffers)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # tensors the codec cannot rebuild
            raise FormatError(f"payload does not decode: {exc!r:.200}") from None
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
