"""The content-addressed object store: objects/ab/cd/<rest of hash> (SPEC section 8).

Two implementations share one interface (`ObjectStore` below): `Store`, a directory
on this host (or on a filesystem every host mounts), here; and `S3Store`, a bucket
(s3store.py). Everything above them (executor, engine, commands, housekeeping)
uses only the interface.

Objects are immutable and read-only (0444). They get there by hashing a file
once, streaming, then renaming it into place: no copy when the file is already
on the store's filesystem (a task's OUTPUT_DIR usually is). A file that is not
ours alone (hard-linked elsewhere) or on another filesystem is copied instead,
hashed while it is copied. Before the database refers to an object its bytes
are on disk: fsynced one by one, or, for task outputs, by one `sync()` of the
filesystem per commit batch. Writing an object that exists already just drops
the new file: identical outputs are stored once.

Reading never trusts the file: objects are opened without following symlinks,
and a copy handed to a script is hashed as it is copied (a damaged object fails
that task by name instead of poisoning its results).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

from task_pipeline import fsutil
from task_pipeline.errors import StoreError

CHUNK = 1 << 20
ALGORITHMS = ("sha256", "blake3")
_BLAKE3_THREADS_FROM = 16 << 20  # below this, threading costs more than it gains
DIR_MODE = 0o750     # objects/ and its shard directories
TMP_MODE = 0o700     # tmp/: scratch of running scripts and objects being written
OBJECT_MODE = 0o444


@dataclass(frozen=True)
class ObjectEntry:
    """One thing found where objects live, as gc and fsck see it."""

    name: str          # the hash it is stored under (or whatever name a stray file has)
    where: str         # its path or URL, for messages
    size: int
    changed: float     # when it was last written or refreshed (ctime; a bucket's LastModified)
    regular: bool      # a plain object (not a symlink, directory or device)


class ObjectStore(Protocol):
    """What the rest of task-pipeline needs from a place that keeps objects by hash.

    Every object is written once under its hash and never changes. Writers hash what they
    store as they read it; readers check the hash as they copy (`copy_to_fd`, `stream`).
    """

    algo: str
    local: bool                      # objects are files on this host's filesystem (hard links possible)

    def describe(self) -> str: ...
    def create_dirs(self) -> None: ...
    def check(self) -> None: ...
    def path_str(self, h: str) -> str: ...
    def name_of(self, where: str) -> str | None:
        """The hash of the object at `where` (a path or URL as `path_str` gives it), or None."""
    def has(self, h: str) -> bool: ...
    def ingest_output(self, dir_fd: int, name: str, fd: int, st: os.stat_result, *,
                      cancel: Callable[[], bool] | None = None, settled: bool = False) -> tuple[str, int]: ...
    def ingest_log(self, fd: int, size: int) -> tuple[str, int]: ...
    def ingest_path(self, src: Path | str) -> tuple[str, int]: ...
    def ingest_stream(self, f: BinaryIO) -> tuple[str, int]: ...
    def ingest_bytes(self, data: bytes) -> tuple[str, int]: ...
    @property
    def empty(self) -> tuple[str, int]: ...
    def sync(self) -> None: ...
    def copy_to_fd(self, h: str, out: int) -> int: ...
    def stream(self, h: str, out: BinaryIO) -> None: ...
    def read_tail(self, h: str, limit: int) -> tuple[bytes, int]: ...
    def rehash(self, h: str) -> str | None: ...
    def scan(self) -> Iterator[ObjectEntry]: ...
    def remove(self, h: str, changed_before: float) -> bool: ...
    def tidy(self, older_than: float, dry_run: bool = False, prune: bool = True) -> tuple[int, int]: ...


class ObjectError(StoreError):
    """An object a task needs is missing or damaged: that task fails, the others go on."""

    def __init__(self, message: str, h: str) -> None:
        super().__init__(message)
        self.hash = h


class StoreUnavailable(StoreError):
    """The object store cannot be reached or refused a write for now (a bucket's network, its server):
    not the script's fault; the attempt goes back to the queue."""


class OutputChanged(Exception):
    """An output file was replaced while it was being stored (by a process the attempt left behind)."""


class Cancelled(Exception):
    """Storing was abandoned because the runner is stopping."""


def new_hasher(algo: str, size_hint: int = 0):
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake3":
        import blake3

        threads = blake3.blake3.AUTO if size_hint >= _BLAKE3_THREADS_FROM else 1
        return blake3.blake3(max_threads=threads)
    raise StoreError(f"unknown hash algorithm '{algo}'; use one of: {', '.join(ALGORITHMS)}")


def hash_fd(fd: int, algo: str, size_hint: int = 0, cancel: Callable[[], bool] | None = None) -> tuple[str, int]:
    """Hash an open file from its current offset to the end, in fixed-size chunks.

    `cancel` is asked between chunks, so that a huge output does not hold up a shutdown."""
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
        if cancel is not None and cancel():
            raise Cancelled()
    return h.hexdigest(), size


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _touch(path: str) -> bool:
    """Refresh an existing object's ctime, so that gc sees it is in use again (an identical output
    not committed yet). False if there is no such object (or gc removed it meanwhile): then the
    caller stores its own copy. One syscall answers both "does it exist" and "keep it"."""
    try:
        os.utime(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        pass  # not ours to touch (another user's store): it exists, which is what matters
    return True


@dataclass(frozen=True)
class Store:
    """Objects in a directory: `objects`; `tmp` (same filesystem) holds files being written."""

    objects: Path
    tmp: Path
    algo: str = "sha256"
    _shards: set = field(default_factory=set, compare=False, repr=False)
    local = True

    def describe(self) -> str:
        return str(self.objects)

    @classmethod
    def at(cls, root: Path | str, algo: str = "sha256") -> "Store":
        """The layout of a store directory: ROOT/objects and ROOT/tmp."""
        root = Path(root)
        return cls(root / "objects", root / "tmp", algo)

    def create_dirs(self) -> None:
        for d, mode in ((self.objects, DIR_MODE), (self.tmp, TMP_MODE)):
            try:
                fsutil.make_dirs(str(d), mode)
            except OSError as e:
                raise StoreError(f"{d}: cannot create: {e.strerror}") from None

    def check(self) -> None:
        """Refuse directories another user could tamper with (see fsutil.check_private)."""
        fsutil.check_private(str(self.objects), "objects directory")
        fsutil.check_private(str(self.tmp), "scratch directory")

    def path(self, h: str) -> Path:
        return Path(self.path_str(h))

    def path_str(self, h: str) -> str:
        # str, not Path: this runs for every output and log, and pathlib is slow at it
        return f"{self._objects}/{h[:2]}/{h[2:4]}/{h[4:]}"

    @cached_property
    def _objects(self) -> str:
        return str(self.objects)

    def name_of(self, where: str) -> str | None:
        path = os.path.normpath(os.path.abspath(where))
        for base in (os.path.abspath(self.objects), os.path.realpath(self.objects)):
            rel = os.path.relpath(path, base)
            if not rel.startswith(".."):
                return rel.replace("/", "")
        return None

    @cached_property
    def _tmp_dev(self) -> int | None:
        try:
            return os.stat(self.tmp).st_dev
        except OSError:
            return None

    def has(self, h: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path_str(h)).st_mode)
        except OSError:
            return False

    # -- writing ---------------------------------------------------------

    def ingest_fd(self, fd: int, src: Path | str, *, fsync: bool = True, size: int | None = None) -> tuple[str, int]:
        """Hash the open regular file `fd`, a file the store owns in tmp/ (named `src`), and move it in.

        With fsync=False the caller promises to call `sync()` before anything refers to
        the object (the engine does, once per commit batch, which is far cheaper than a
        flush per file and also covers the renames).
        """
        if size is None:
            size = os.fstat(fd).st_size
        digest, size = hash_fd(fd, self.algo, size)
        dest = self.path_str(digest)
        if _touch(dest):
            os.unlink(src)
            return digest, size
        os.fchmod(fd, OBJECT_MODE)
        if fsync:
            os.fsync(fd)
        self._place(str(src), dest)
        return digest, size

    def ingest_output(self, dir_fd: int, name: str, fd: int, st: os.stat_result, *,
                      cancel: Callable[[], bool] | None = None, settled: bool = False) -> tuple[str, int]:
        """Store the output `name` in the scratch directory `dir_fd`, open as `fd` (fstat `st`).

        The file is moved in only when it is ours alone: on the store's filesystem and
        not hard-linked anywhere else (a link to a file outside would let that file's
        later edits corrupt the object). It is moved by way of a private name in tmp/,
        and what arrived there is checked to be the inode that was hashed: a name
        swapped meanwhile (for a symlink, say) is never stored. `settled`: nothing of the
        attempt runs any more, so the name cannot change, and it is moved straight in.
        Otherwise it is copied. Not fsynced: the engine syncs once per commit batch.
        """
        if st.st_nlink != 1 or st.st_dev != self._tmp_dev:
            return self._copy_in(fd, st.st_size, fsync=False, cancel=cancel)
        digest, size = hash_fd(fd, self.algo, st.st_size, cancel)
        dest = self.path_str(digest)
        if _touch(dest):
            return digest, size  # stored already; the scratch copy goes with the attempt's directory
        if settled:
            os.fchmod(fd, OBJECT_MODE)
            self._place(name, dest, src_dir_fd=dir_fd)
            return digest, size
        hop = self.tmp_file("out")
        os.rename(name, hop, src_dir_fd=dir_fd)
        try:
            arrived = os.lstat(hop)
            if not fsutil.same_inode(arrived, st) or not stat.S_ISREG(arrived.st_mode):
                raise OutputChanged(name)
            os.fchmod(fd, OBJECT_MODE)
            self._place(hop, dest)
        except BaseException:
            try:
                os.unlink(hop)
            except OSError:
                pass
            raise
        return digest, size

    def ingest_path(self, src: Path | str) -> tuple[str, int]:
        """Ingest a file the store does not own (e.g. `submit FILE`): copied in, hashed on the way."""
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"{src}: cannot read: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{src}: not a regular file")
            return self._copy_in(fd, st.st_size)
        finally:
            os.close(fd)

    def ingest_bytes(self, data: bytes) -> tuple[str, int]:
        tmp = self.tmp_file("bytes")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
            return self.ingest_fd(fd, tmp, size=len(data))
        finally:
            os.close(fd)

    def ingest_stream(self, f: BinaryIO) -> tuple[str, int]:
        """Store what a stream (stdin) holds, hashed as it is written."""
        return self._copy_in(f.fileno(), None)

    def ingest_log(self, fd: int, size: int) -> tuple[str, int]:
        """Store a script's log from the descriptor it was given (its name in the slot is not trusted).
        Not fsynced: the engine syncs once per commit batch."""
        os.lseek(fd, 0, os.SEEK_SET)
        return self._copy_in(fd, size, fsync=False)

    def _copy_in(self, fd: int, size: int | None, *, fsync: bool = True,
                 cancel: Callable[[], bool] | None = None) -> tuple[str, int]:
        h = new_hasher(self.algo, size or 0)
        tmp = self.tmp_file("copy")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            n = 0
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                h.update(data)
                _write_all(out, data)
                n += len(data)
                if cancel is not None and cancel():
                    raise Cancelled()
            digest = h.hexdigest()
            dest = self.path_str(digest)
            if _touch(dest):
                os.unlink(tmp)
                return digest, n
            os.fchmod(out, OBJECT_MODE)
            if fsync:
                os.fsync(out)
            self._place(tmp, dest)
            return digest, n
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            os.close(out)

    @cached_property
    def empty(self) -> tuple[str, int]:
        """The empty object, which most logs are: stored once, then referred to without any file work."""
        return self.ingest_bytes(b"")

    def sync(self) -> None:
        """Flush everything written to the store's filesystem (objects and their directory entries)."""
        fd = os.open(self.objects, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs = fsutil.libc_function("syncfs")
            if syncfs is None or syncfs(fd) != 0:  # not Linux, or it failed: sync() everything
                os.sync()
        finally:
            os.close(fd)

    def tmp_file(self, label: str) -> str:
        return f"{self.tmp}/{label}-{os.getpid()}-{os.urandom(6).hex()}"

    def _place(self, src: str, dest: str, src_dir_fd: int | None = None) -> None:
        shard = os.path.dirname(dest)
        if shard not in self._shards:  # most new objects need a new shard directory: make it first
            fsutil.make_dirs(shard, DIR_MODE)
            self._shards.add(shard)
        try:
            os.rename(src, dest, src_dir_fd=src_dir_fd)
        except FileNotFoundError:  # the shard was removed meanwhile (gc --force of an empty shard)
            fsutil.make_dirs(shard, DIR_MODE)
            os.rename(src, dest, src_dir_fd=src_dir_fd)

    # -- reading ---------------------------------------------------------

    def _open_fd(self, h: str) -> int:
        try:
            fd = os.open(self.path_str(h), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectError(f"object {h} is missing from {self.objects}; run 'task-pipeline fsck' to see "
                              f"what used it", h) from None
        except OSError as e:
            why = "is a symlink, not an object" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
            raise ObjectError(f"object {h} {why} ({self.path_str(h)}); run 'task-pipeline fsck'", h) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ObjectError(f"object {h} is not a regular file ({self.path_str(h)}); run 'task-pipeline fsck'", h)
        return fd

    def open(self, h: str) -> BinaryIO:
        return os.fdopen(self._open_fd(h), "rb")

    def copy_to_fd(self, h: str, out: int) -> int:
        """Copy object `h` into the open file `out`, checking on the way that its bytes still hash to `h`.
        Returns the size. Raises ObjectError (missing, or damaged)."""
        src = self._open_fd(h)
        try:
            size = os.fstat(src).st_size
            hasher = new_hasher(self.algo, size)
            n = 0
            while True:
                data = os.read(src, CHUNK)
                if not data:
                    break
                hasher.update(data)
                _write_all(out, data)
                n += len(data)
        finally:
            os.close(src)
        actual = hasher.hexdigest()
        if actual != h:
            raise ObjectError(f"object {h} is damaged: its bytes hash to {actual[:16]}...; run 'task-pipeline fsck'", h)
        return n

    def stream(self, h: str, out: BinaryIO) -> None:
        """Write object `h` to `out`; a damaged object is an error at the end (what was written cannot be taken back)."""
        fd = self._open_fd(h)
        hasher = new_hasher(self.algo)
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                hasher.update(data)
                out.write(data)
        finally:
            os.close(fd)
        actual = hasher.hexdigest()
        if actual != h:
            out.flush()
            raise ObjectError(f"object {h} is damaged: its bytes hash to {actual[:16]}...; run 'task-pipeline fsck'", h)

    def read_tail(self, h: str, limit: int) -> tuple[bytes, int]:
        """The last `limit` bytes of object `h` (where a log's error is), and its size."""
        fd = self._open_fd(h)
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, limit, max(size - limit, 0)), size
        finally:
            os.close(fd)

    def rehash(self, h: str) -> str | None:
        """The object's actual hash, or None if it is missing or not a regular file."""
        try:
            fd = self._open_fd(h)
        except ObjectError:
            return None
        try:
            return hash_fd(fd, self.algo, os.fstat(fd).st_size)[0]
        finally:
            os.close(fd)

    # -- housekeeping ----------------------------------------------------

    INCOMING = "incoming"  # objects being written, when objects live outside a store directory

    def scan(self) -> Iterator[ObjectEntry]:
        """Everything under objects/, whatever it is (a stray file or a symlink is reported, not followed)."""
        root = str(self.objects)
        if not os.path.isdir(root):
            return
        for a in sorted(os.scandir(root), key=lambda e: e.name):
            if a.name == self.INCOMING and a.is_dir(follow_symlinks=False):
                continue
            if not a.is_dir(follow_symlinks=False):
                yield _entry(a.name, a.path)
                continue
            for b in sorted(os.scandir(a.path), key=lambda e: e.name):
                if not b.is_dir(follow_symlinks=False):
                    yield _entry(a.name + b.name, b.path)
                    continue
                for f in os.scandir(b.path):
                    entry = _entry(a.name + b.name + f.name, f.path)
                    if entry is not None:
                        yield entry

    def remove(self, h: str, changed_before: float) -> bool:
        """Delete object `h` unless it changed since `changed_before` (looked at again right before:
        a runner may have just stored an identical output, which touches it)."""
        path = self.path_str(h)
        try:
            if os.lstat(path).st_ctime >= changed_before:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def tidy(self, older_than: float, dry_run: bool = False, prune: bool = True) -> tuple[int, int]:
        """Remove files in objects/incoming older than `older_than` (uploads that a runner on some
        host began and never finished) and, with `prune`, empty shard directories (not while
        runners may be about to write into them). Returns (files, bytes)."""
        files = size = 0
        incoming = self.objects / self.INCOMING
        if incoming.is_dir():
            for e in os.scandir(incoming):
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_mtime < older_than:
                    files, size = files + 1, size + st.st_size
                    if not dry_run:
                        try:
                            os.unlink(e.path)
                        except OSError:
                            pass
        if dry_run or not prune or not self.objects.is_dir():
            return files, size
        for a in os.scandir(self.objects):
            if not a.is_dir(follow_symlinks=False) or a.name == self.INCOMING:
                continue
            for b in os.scandir(a.path):
                if b.is_dir(follow_symlinks=False):
                    try:
                        os.rmdir(b.path)
                    except OSError:
                        pass
            try:
                os.rmdir(a.path)
            except OSError:
                pass
        return files, size


def has_objects(objects: str) -> bool:
    """Whether a directory holds objects (a shard directory): then a database next to it that is
    missing or empty means lost state, not a new store."""
    try:
        with os.scandir(objects) as it:
            return any(len(e.name) == 2 and e.is_dir(follow_symlinks=False) for e in it)
    except OSError:
        return False


def _entry(name: str, path: str) -> ObjectEntry | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return ObjectEntry(name, path, st.st_size, st.st_ctime, stat.S_ISREG(st.st_mode))
