"""Filesystem primitives that never follow a symlink planted by a script or another user.

Scratch directories are writable by the scripts that run in them, and a store
directory may sit where other local users can see it. Everything here works
relative to directory file descriptors opened with O_NOFOLLOW, so that a name
swapped for a symlink between two calls can make an operation fail, but never
make it read, move, change or delete anything outside the directory it was
given. Directories are created with fixed modes, whatever the umask.
"""

from __future__ import annotations

import functools
import os
import stat

from task_pipeline.errors import StoreError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@functools.cache
def libc_function(name: str, *argtypes):
    """A C library function Python's os module lacks (syncfs, fallocate with flags), or None where
    there is none. Looked up in the process's own symbols on first use: ctypes.util.find_library
    runs `ldconfig -p` in a subprocess, milliseconds of every command's start."""
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    if argtypes:
        fn.argtypes = argtypes
    return fn


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink in its last component."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def _read_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import (os.umask is process-wide: not for threads to juggle)


def make_dir(name: str, mode: int, dir_fd: int | None = None) -> None:
    """mkdir with exactly `mode`, whatever the umask. One syscall when the umask leaves `mode` alone
    (the common case: this runs several times per task); otherwise the mode is set afterwards,
    through a descriptor, so that a name swapped meanwhile is not followed."""
    os.mkdir(name, mode, dir_fd=dir_fd)
    if mode & _UMASK == 0:
        return
    fd = open_dir(name, dir_fd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int) -> None:
    """`mkdir -p` where every directory it creates gets `mode` (os.makedirs gives parents 0777 & ~umask).
    The directory itself is tried first: a new object's shard directory usually has its parent
    already, and looking before leaping cost a stat of each level on every new object."""
    try:
        make_dir(path, mode)
        return
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip("/"))
        if not parent or parent == path:
            raise
    make_dirs(parent, mode)
    try:
        make_dir(path, mode)
    except FileExistsError:
        pass


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove `name` in `dir_fd` and, if it is a directory, everything below it.

    Never follows a symlink (a symlink is removed, not its target). Directories a
    script made read-only or unsearchable are given back their owner's permissions
    first. Raises OSError if something cannot be removed.
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        return
    try:
        fd = open_dir(name, dir_fd)
    except PermissionError:
        # mode 000 or similar: lstat said it is a real directory (scripts are stopped by now)
        os.chmod(name, 0o700, dir_fd=dir_fd)
        fd = open_dir(name, dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            os.fchmod(fd, 0o700)
        empty_dir_fd(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def empty_dir_fd(fd: int) -> None:
    """Remove everything inside the open directory `fd` (not following symlinks)."""
    with os.scandir(fd) as it:
        names = [e.name for e in it]
    for n in names:
        remove_tree_at(fd, n)


def tree_size_at(dir_fd: int | None, name: str) -> int:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    try:
        fd = open_dir(name, dir_fd)
    except OSError:
        return 0
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
        return sum(tree_size_at(fd, n) for n in names)
    finally:
        os.close(fd)


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_private(path: str, what: str) -> None:
    """Refuse a store directory that another user could plant files or symlinks in.

    It must be a real directory (not a symlink), owned by the user running us, and not
    writable by others. A missing directory is fine (it will be created).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"{path}: cannot read the {what}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        # the store root itself may be reached through a symlink the user made; its parts may not
        if what == "store directory":
            return check_private(os.path.realpath(path), what)
        raise StoreError(f"{path}: the {what} is a symlink; the store's directories must be real directories "
                         f"(a symlink there could point anywhere)")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: the {what} is not a directory; point -db elsewhere")
    me = os.geteuid()
    if st.st_uid != me:
        raise StoreError(f"{path}: the {what} belongs to {_user(st.st_uid)}, not to {_user(me)} who runs this; "
                         f"run task-pipeline as {_user(st.st_uid)} (e.g. sudo -u {_user(st.st_uid)} ...), "
                         f"or take it over: chown -R {_user(me)} {path}")
    if st.st_mode & stat.S_IWOTH:
        raise StoreError(f"{path}: the {what} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}), so "
                         f"anyone could plant files in it; fix it with: chmod o-w {path}")


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"
