"""One entry as bytes: the self-describing, checksummed form every persistent tier stores.

Operations: `plan_header` (the header of an entry, exact size known before
any tensor byte is touched), `checksum_of` (the digest a header's checksum
field must hold), `encode_entry` (header and tensors as a list of buffers,
checksummed), `verify_entry` (parse, check, checksum and decode a buffer),
`check_identity`.

The bytes are the disk tier's file format (format.py): a safetensors file.
The checksum covers every byte, the checksum's own hex digits read as zeros:
a flipped bit anywhere (header or tensors) is caught. An entry is served only
if its size, format, key, namespace, layout and
`key == hash(parent, token_ids)` all match what the reader expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvcellar.cache import CacheEntry, hash_block, hash_tail
from kvcellar.tiers.codec import PayloadCodec
from kvcellar.tiers.format import (
    DEFAULT_CHECKSUM,
    EntryHeader,
    FormatError,
    encode_header,
    new_checksum,
    ordered,
    parse_header,
    placeholder_checksum,
)

_CHECKSUM_FIELD = b'"checksum":"'


def plan_header(entry: CacheEntry, codec: PayloadCodec, algorithm: str = DEFAULT_CHECKSUM) -> EntryHeader:
    """The header `entry` will be stored with (placeholder checksum); ValueError if not storable."""
    if entry.namespace is None:
        raise ValueError("an entry needs its namespace to be stored outside memory")
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


def _checksum_span(head: bytes) -> tuple[int, int]:
    """(start, end) of the checksum's hex digits inside the encoded header."""
    start = head.find(_CHECKSUM_FIELD)
    if start < 0:
        raise FormatError("no checksum field")
    start = head.index(b":", start + len(_CHECKSUM_FIELD)) + 1
    return start, head.index(b'"', start)


def checksum_of(algorithm: str, head: bytes, body: Sequence[bytes | memoryview]) -> str:
    """The hex digest of an encoded header (its checksum digits read as zeros) followed by `body`."""
    start, end = _checksum_span(head)
    hasher = new_checksum(algorithm)
    hasher.update(head[:start] + b"0" * (end - start) + head[end:])
    for chunk in body:
        hasher.update(chunk)
    return hasher.hexdigest()


def tensor_buffers(header: EntryHeader, payload: object, codec: PayloadCodec) -> list[memoryview]:
    """The payload's tensor bytes in header order, each checked against its spec."""
    buffers = codec.tensor_bytes(payload, header.tensors)
    for spec, buffer in zip(header.tensors, buffers):
        if buffer.nbytes != spec.num_bytes:
            raise ValueError(f"tensor {spec.name!r} has {buffer.nbytes} bytes, its spec says {spec.num_bytes}")
    return buffers


def encode_entry(header: EntryHeader, payload: object, codec: PayloadCodec) -> list[bytes | memoryview]:
    """The entry's bytes as buffers (final header first, then the tensors, not copied); their sizes sum to
    `header.file_size`."""
    buffers = tensor_buffers(header, payload, codec)
    algorithm = header.checksum.split(":", 1)[0]
    zeroed = encode_header(replace(header, checksum=placeholder_checksum(algorithm)))
    head = encode_header(replace(header, checksum=f"{algorithm}:{checksum_of(algorithm, zeroed, buffers)}"))
    return [head, *buffers]


def check_identity(header: EntryHeader, size: int, key: bytes, namespace: bytes | None, layout: str) -> None:
    """FormatError unless the entry is consistent in itself and is the one `key` (and `namespace`) name."""
    problems = [
        (size != header.file_size, f"entry has {size} bytes, its header describes {header.file_size}"),
        (header.key != key, "key differs from the name it is stored under"),
        (namespace is not None and header.namespace != namespace, "namespace differs"),
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


def verify_entry(
    data: bytes | memoryview, codec: PayloadCodec, *, key: bytes, namespace: bytes | None = None
) -> tuple[EntryHeader, object]:
    """(header, payload) of bytes that pass every check (the payload may view `data`); FormatError otherwise."""
    view = memoryview(data)
    header, offset = parse_header(view)
    check_identity(header, len(view), key, namespace, codec.layout)
    algorithm, _, stored = header.checksum.partition(":")
    try:
        actual = checksum_of(algorithm, bytes(view[:offset]), [view[offset:]])
    except ValueError as exc:  # an algorithm this process lacks: unverifiable, so never served
        raise FormatError(str(exc)) from None
    if actual != stored:
        raise FormatError("checksum mismatch")
    buffers, position = [], offset
    for spec in header.tensors:
        buffers.append(view[position : position + spec.num_bytes])
        position += spec.num_bytes
    try:
        payload = codec.decode(header, buffers)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # tensors the codec cannot rebuild
        raise FormatError(f"payload does not decode: {exc!r:.200}") from None
    return header, payload
