"""The content-addressed object store: DB_DIR/objects/ab/cd/<rest of hash> (SPEC section 8).

Objects are immutable and read-only (0444). They get there by hashing a file
once, streaming, then renaming it into place: no copy when the file is already
on the store's filesystem (a task's OUTPUT_DIR is). Before the database refers
to an object its bytes are on disk: fsynced one by one, or, for task outputs,
by one `sync()` of the filesystem per commit batch.
Writing an object that exists already just drops the new file: identical
outputs are stored once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Iterator

from task_pipeline.errors import StoreError

CHUNK = 1 << 20
ALGORITHMS = ("sha256", "blake3")
_BLAKE3_THREADS_FROM = 16 << 20  # below this, threading costs more than it gains


try:
    _syncfs = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).syncfs
except (OSError, AttributeError):  # not Linux: fall back to sync()
    _syncfs = None


def new_hasher(algo: str, size_hint: int = 0):
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake3":
        import blake3

        threads = blake3.blake3.AUTO if size_hint >= _BLAKE3_THREADS_FROM else 1
        return blake3.blake3(max_threads=threads)
    raise StoreError(f"unknown hash algorithm '{algo}'; use one of: {', '.join(ALGORITHMS)}")


def hash_fd(fd: int, algo: str, size_hint: int = 0) -> tuple[str, int]:
    """Hash an open file from its current offset to the end, in fixed-size chunks."""
    h = new_hasher(algo, size_hint)
    if size_hint < CHUNK:
        # Most outputs are small: one read, one update. A short read of a regular file is its end.
        data = os.read(fd, size_hint + 1)
        h.update(data)
        if len(data) <= size_hint:
            return h.hexdigest(), len(data)
        size = len(data)
    else:
        size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        h.update(view[:n])
        size += n
    return h.hexdigest(), size


def _touch(path: str) -> bool:
    """Refresh an existing object's ctime, so that gc sees it is in use again (an identical output
    not committed yet). False if there is no such object (or gc removed it meanwhile): then the
    caller stores its own copy. One syscall answers both "does it exist" and "keep it"."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    except OSError:
        pass  # not ours to touch (another user's store): it exists, which is what matters
    return True


@dataclass(frozen=True)
class Store:
    root: Path
    algo: str = "sha256"

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def create_dirs(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, h: str) -> Path:
        return Path(self.path_str(h))

    def path_str(self, h: str) -> str:
        # str, not Path: this runs for every output and log, and pathlib is slow at it
        return f"{self._objects}/{h[:2]}/{h[2:4]}/{h[4:]}"

    @cached_property
    def _objects(self) -> str:
        return str(self.objects)

    def has(self, h: str) -> bool:
        return os.path.exists(self.path(h))

    # -- writing ---------------------------------------------------------

    def ingest_fd(self, fd: int, src: Path | str, *, fsync: bool = True, size: int | None = None) -> tuple[str, int]:
        """Hash the open regular file `fd` (freshly opened, whose name is `src`, of `size` bytes if
        the caller knows), fsync it, and move it into the store.

        With fsync=False the caller promises to call `sync()` before anything refers to
        the object (the engine does, once per commit batch, which is far cheaper than a
        flush per file and also covers the renames).

        The file must be on the store's filesystem for the move to be a rename;
        otherwise it is copied to tmp/ first.
        """
        if size is None:
            size = os.fstat(fd).st_size
        digest, size = hash_fd(fd, self.algo, size)
        dest = self.path_str(digest)
        if _touch(dest):
            os.unlink(src)
            return digest, size
        os.fchmod(fd, 0o444)
        if fsync:
            os.fsync(fd)
        self._place(src, dest)
        return digest, size

    def ingest_path(self, src: Path) -> tuple[str, int]:
        """Ingest a file the store does not own (e.g. `submit FILE`): copy to tmp/, then move in."""
        if not os.path.isfile(src):
            raise StoreError(f"{src}: not a regular file")
        tmp = self.tmp_file("ingest")
        shutil.copyfile(src, tmp)
        return self.ingest_owned(tmp)

    def ingest_bytes(self, data: bytes) -> tuple[str, int]:
        tmp = self.tmp_file("bytes")
        with open(tmp, "wb") as f:
            f.write(data)
        return self.ingest_owned(tmp)

    def ingest_owned(self, path: Path) -> tuple[str, int]:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return self.ingest_fd(fd, path)
        finally:
            os.close(fd)

    @cached_property
    def empty(self) -> tuple[str, int]:
        """The empty object, which most logs are: stored once, then referred to without any file work."""
        return self.ingest_bytes(b"")

    def sync(self) -> None:
        """Flush everything written to the store's filesystem (objects and their directory entries)."""
        fd = os.open(self.objects, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def tmp_file(self, label: str) -> Path:
        return self.tmp / f"{label}-{os.getpid()}-{os.urandom(6).hex()}"

    @cached_property
    def _shards(self) -> set[str]:
        return set()

    def _place(self, src: Path | str, dest: str) -> None:
        shard = os.path.dirname(dest)
        if shard not in self._shards:  # most new objects need a new shard directory: make it first
            os.makedirs(shard, exist_ok=True)
            self._shards.add(shard)
        try:
            os.rename(src, dest)
        except FileNotFoundError:  # removed meanwhile (gc --force of an empty shard)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = self.tmp_file("xdev")
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(tmp, dest)
            os.unlink(src)

    # -- reading ---------------------------------------------------------

    def open(self, h: str) -> BinaryIO:
        try:
            return open(self.path(h), "rb")
        except FileNotFoundError:
            raise StoreError(f"object {h} is missing from {self.objects}; run 'task-pipeline fsck' to see what used it") from None

    def copy_to(self, h: str, dest: Path) -> None:
        """A private, read-only copy (never a hard link: a script could chmod and write through it).

        copy_file_range lets the kernel copy (or share extents, where the filesystem can).
        """
        try:
            src = os.open(self.path(h), os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"object {h} is missing from {self.objects}; run 'task-pipeline fsck'") from None
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
            try:
                left = os.fstat(src).st_size
                while left > 0:
                    n = os.copy_file_range(src, out, min(left, 1 << 30))
                    if n == 0:
                        break
                    left -= n
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.lseek(src, 0, os.SEEK_SET)
                os.ftruncate(out, 0)
                with open(src, "rb", closefd=False) as fi, open(out, "wb", closefd=False) as fo:
                    shutil.copyfileobj(fi, fo, CHUNK)
            finally:
                os.close(out)
        finally:
            os.close(src)

    def stream(self, h: str, out: BinaryIO) -> None:
        with self.open(h) as f:
            shutil.copyfileobj(f, out, CHUNK)

    def rehash(self, h: str) -> str | None:
        """The object's actual hash, or None if it is missing."""
        try:
            fd = os.open(self.path(h), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            return hash_fd(fd, self.algo, os.fstat(fd).st_size)[0]
        finally:
            os.close(fd)

    def iter_objects(self) -> Iterator[tuple[str, Path]]:
        if not self.objects.is_dir():
            return
        for a in sorted(os.scandir(self.objects), key=lambda e: e.name):
            if not a.is_dir(follow_symlinks=False):
                continue
            for b in sorted(os.scandir(a.path), key=lambda e: e.name):
                if not b.is_dir(follow_symlinks=False):
                    continue
                for f in os.scandir(b.path):
                    yield a.name + b.name + f.name, Path(f.path)
