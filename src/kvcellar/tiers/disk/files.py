"""Files of a disk cache directory: where each thing lives, atomic writes, mapped reads, quarantine, lock.

Operations: `CacheDir` (paths; `entry_path` from namespace and key only),
`write_atomic` (temp file in the same folder, fsync, drop its clean pages
from the page cache, rename, fsync folder),
`write_chunks` (the one place bytes hit a file: tests replace it to inject
ENOSPC), `map_file` (the whole file as a private mapping),
`quarantine`, `remove_quarantined`, `set_index_aside` (a damaged index,
before it is rebuilt),
`scan_entries`, `DirLock`, `CacheDirError`.

Layout of a cache directory:
  KVCELLAR_CACHE                     marker: only a folder holding it (or an empty one) is used
  lock                               flock held by the process that has the cache open
  index.sqlite3                      the index (WAL mode)
  entries-v1/<ns16>/<k2>/<key>.safetensors   one entry; ns16 = first 16 hex digits of the namespace
  quarantine/<key>.<reason>.safetensors      files that failed validation (at most MAX_QUARANTINE kept)
  quarantine/index.sqlite3.damaged-<time>    an index SQLite could not use (rebuilt from the files' headers)
Temp files are `<key>.safetensors.<pid>.<n>.tmp` beside their target; any
left at start-up belong to a write that never finished and are deleted.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from kvcellar.errors import KvcellarError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock, one process per directory is on the user
    fcntl = None

MARKER = "KVCELLAR_CACHE"
ENTRIES = "entries-v1"
SUFFIX = ".safetensors"
MAX_QUARANTINE = 32
_ENTRY_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_temp_counter = itertools.count()


class CacheDirError(KvcellarError, RuntimeError):
    """The directory cannot be used as a cache (in use, or not a kvcellar cache)."""


class CacheDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.entries = self.root / ENTRIES
        self.quarantine_dir = self.root / "quarantine"
        self.index_path = self.root / "index.sqlite3"
        self.lock_path = self.root / "lock"
        self.marker = self.root / MARKER

    def entry_path(self, namespace: bytes, key: bytes) -> Path:
        hex_key = key.hex()
        return self.entries / namespace.hex()[:16] / hex_key[:2] / f"{hex_key}{SUFFIX}"

    def is_cache(self) -> bool:
        return self.marker.is_file()

    def create(self) -> None:
        """Make the folder a cache directory; refuse a non-empty folder that is not one."""
        if self.root.exists() and not self.is_cache() and any(self.root.iterdir()):
            raise CacheDirError(
                f"{self.root} is not empty and is not a kvcellar cache directory; "
                "pass an empty or new folder as --cache-dir"
            )
        self.entries.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(exist_ok=True)
        if not self.is_cache():
            self.marker.write_text("kvcellar disk cache, format 1\n")
            fsync_dir(self.root)


def write_chunks(fd: int, chunks: Iterable[bytes | memoryview]) -> int:
    """Write every chunk to `fd`; returns the bytes written. Raises OSError (e.g. ENOSPC)."""
    total = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            written = os.write(fd, view)
            total += written
            view = view[written:]
    return total


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, known: set[Path]) -> None:
    """Create `path` (and parents up to an existing one), fsyncing each parent so the entry is durable."""
    if path in known:
        return
    if not path.is_dir():
        ensure_dir(path.parent, known)
        try:
            path.mkdir()
        except FileExistsError:
            pass
        fsync_dir(path.parent)
    known.add(path)


def drop_cached_pages(fd: int) -> None:
    """Evict the file's (clean, just fsynced) pages from the page cache; no-op without posix_fadvise (macOS).

    Files written back to back cost write() several times more CPU while the
    page cache grows onto memory not touched lately than with each file's
    pages dropped after its fsync (the next file's write reuses them at once);
    the DONTNEED call itself is cheap. A later read
    of the entry comes from the disk instead of the page cache: the tier's
    reads are restores after a restart or an eviction, rarely right after a
    write, and the memory stays with the model and the RAM tiers.
    """
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None:
        fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_atomic(
    path: Path, chunks: Iterable[bytes | memoryview], known_dirs: set[Path], final_start: Callable[[], bytes] | None = None
) -> int:
    """Write `path` so that it either does not exist or is complete, even after kill -9 or power loss.

    `final_start()`, called once every chunk is written, gives bytes that
    overwrite the start of the (still invisible) temp file: a header whose
    checksum covers the rest.
    """
    ensure_dir(path.parent, known_dirs)
    temp = path.with_name(f"{path.name}.{os.getpid()}.{next(_temp_counter)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            num_bytes = write_chunks(fd, chunks)
            if final_start is not None:
                start = final_start()
                if os.pwrite(fd, start, 0) != len(start):
                    raise OSError(f"short write of the first {len(start)} bytes of {temp}")
            os.fsync(fd)  # data durable before the rename makes it visible
            drop_cached_pages(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself durable
    return num_bytes


def map_file(path: Path) -> memoryview:
    """The file's bytes as a private copy-on-write mapping (no copy: views of the page cache).

    Private and writable so tensors can view it in place; nothing ever writes
    to it, so no page is copied. Not MAP_POPULATE: on a writable private
    mapping that pre-faults by copying every page (slower than faulting them in
    lazily from the page cache); the checksum pass faults the pages in
    sequentially anyway. Our files are replaced by rename, never truncated or
    rewritten in place, so the mapping cannot lose or change its pages.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return memoryview(b"")
        try:
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (AttributeError, TypeError):  # pragma: no cover - no POSIX mmap: read instead
            buffer = bytearray(size)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
                handle.readinto(buffer)
            return memoryview(buffer)
        return memoryview(mapped)
    finally:
        os.close(fd)


def quarantine(cache_dir: CacheDir, path: Path, reason: str) -> Path | None:
    """Move a failed file aside (never served again); keeps the newest MAX_QUARANTINE files."""
    label = re.sub(r"[^a-z0-9-]+", "-", reason.lower()).strip("-")[:40] or "invalid"
    target = cache_dir.quarantine_dir / f"{path.name.removesuffix(SUFFIX)}.{label}{SUFFIX}"
    try:
        cache_dir.quarantine_dir.mkdir(exist_ok=True)
        os.replace(path, target)
    except FileNotFoundError:
        return None
    _prune_quarantine(cache_dir)
    return target


def set_index_aside(cache_dir: CacheDir) -> list[Path]:
    """Move the index and its -wal / -shm (files, or whatever else sits there) into quarantine/.

    Named `<name>.damaged-<UTC time>`, kept like quarantined entries; returns the new paths.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    cache_dir.quarantine_dir.mkdir(exist_ok=True)
    moved = []
    for path in (cache_dir.index_path, Path(f"{cache_dir.index_path}-wal"), Path(f"{cache_dir.index_path}-shm")):
        if path.exists() or path.is_symlink():
            target = cache_dir.quarantine_dir / f"{path.name}.damaged-{stamp}"
            for n in itertools.count(1):  # twice in one second: never onto an earlier one
                if not (target.exists() or target.is_symlink()):
                    break
                target = cache_dir.quarantine_dir / f"{path.name}.damaged-{stamp}-{n}"
            os.replace(path, target)
            moved.append(target)
    fsync_dir(cache_dir.root)
    _prune_quarantine(cache_dir)
    return moved


def _prune_quarantine(cache_dir: CacheDir) -> None:
    """Keep the newest MAX_QUARANTINE items (a damaged index path may have been a folder)."""
    kept = sorted(cache_dir.quarantine_dir.iterdir(), key=lambda p: p.lstat().st_mtime, reverse=True)
    for old in kept[MAX_QUARANTINE:]:
        remove_quarantined(old)


def remove_quarantined(path: Path) -> None:
    """Delete one quarantine item: a file, or a folder (a damaged index path may have been one)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def scan_entries(cache_dir: CacheDir) -> tuple[dict[bytes, tuple[str, str]], list[Path], list[Path]]:
    """({key: (namespace prefix, path)}, temp files, stray files) under the entries folder.

    Plain strings for the (many) entry paths: a Path per file would double the start-up time.
    """
    found: dict[bytes, tuple[str, str]] = {}
    temps: list[Path] = []
    strays: list[Path] = []
    if not cache_dir.entries.is_dir():
        return found, temps, strays
    for ns_dir in os.scandir(cache_dir.entries):
        if not ns_dir.is_dir():
            strays.append(Path(ns_dir.path))
            continue
        for shard in os.scandir(ns_dir.path):
            if not shard.is_dir():
                strays.append(Path(shard.path))
                continue
            for item in os.scandir(shard.path):
                name = item.name
                if name.endswith(".tmp"):
                    temps.append(Path(item.path))
                elif _ENTRY_NAME.match(name) and name[:2] == shard.name:
                    key = bytes.fromhex(name[:64])
                    if key in found:
                        strays.append(Path(item.path))
                    else:
                        found[key] = (ns_dir.name, item.path)
                else:
                    strays.append(Path(item.path))
    return found, temps, strays


class DirLock:
    """An exclusive advisory lock on the cache directory, held while a tier has it open."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CacheDirError(
                    f"the cache directory {self._path.parent} is in use by {holder}; stop it (or close its Engine), "
                    "or use another --cache-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
