"""Entry files leave the page cache after their fsync; the bytes written are the same either way."""

from __future__ import annotations

import os

from kvcellar.tiers.disk import files
from kvcellar.tiers.codec import RawCodec
from kvcellar.tiers.blob import plan_header
from kvcellar.tiers.disk.entry_io import Expected, read_entry, write_entry

from .helpers import B, ROOT_A, make_block, payload_for


def _write(tmp_path, name: str):
    entry = make_block(ROOT_A, [1, 2, 3, 4])
    header = plan_header(entry, RawCodec())
    path = tmp_path / name / "entry.safetensors"
    size = write_entry(path, header, entry.payload, RawCodec(), set())
    return entry, path, size


def test_dropping_pages_writes_the_same_checksum_valid_bytes(tmp_path, monkeypatch):
    advised: list[tuple[str, int, int, int]] = []
    real_fadvise = getattr(os, "posix_fadvise", None)

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "", offset, length, advice))
        if real_fadvise is not None:
            real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(files.os, "posix_fadvise", spy, raising=False)
    monkeypatch.setattr(files.os, "POSIX_FADV_DONTNEED", getattr(os, "POSIX_FADV_DONTNEED", 4), raising=False)
    entry, dropped, size = _write(tmp_path, "dropped")
    monkeypatch.setattr(files, "drop_cached_pages", lambda fd: None)
    _, kept, _ = _write(tmp_path, "kept")

    assert dropped.read_bytes() == kept.read_bytes() and size == dropped.stat().st_size
    assert [(offset, length, advice) for _, offset, length, advice in advised] == [(0, 0, os.POSIX_FADV_DONTNEED)]
    if advised[0][0]:  # the temp file, still unrenamed: the advice comes after the fsync, before the rename
        assert advised[0][0].endswith(".tmp")
    expected = Expected(entry.key, entry.parent, entry.namespace, size, False, False, B)
    assert read_entry(dropped, expected, RawCodec())[1] == payload_for(entry.key)


def test_without_posix_fadvise_the_write_still_succeeds(tmp_path, monkeypatch):
    monkeypatch.delattr(files.os, "posix_fadvise", raising=False)
    entry, path, size = _write(tmp_path, "plain")
    expected = Expected(entry.key, entry.parent, entry.namespace, size, False, False, B)
    assert read_entry(path, expected, RawCodec())[1] == payload_for(entry.key)
