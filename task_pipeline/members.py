"""INPUT_DIR: a gather task's members, laid out as files in its attempt's scratch.

The executor copies a gather task's input, the listing (gathering.py), to INPUT_FILE
as for any task; then `lay_out` reads that copy back and writes each member into
`in/members/` under its own name, each copied through the ObjectStore interface, which
checks on the way that the bytes still hash to the name. Everything goes through
directory descriptors opened without following symlinks (fsutil), like the rest of
the attempt's directories, and the directory is made read-only before the script
starts. The attempt's removal takes it with the rest (executor._remove_attempt).
"""

from __future__ import annotations

import os

from task_pipeline import fsutil, gathering
from task_pipeline.store import ObjectError, ObjectStore

FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class MembersError(Exception):
    """The members cannot be laid out (a name clash, a damaged listing): a retry cannot mend it."""


def _read_all(fd: int, size: int) -> bytes:
    chunks, at = [], 0
    while at < size:
        data = os.pread(fd, min(size - at, 1 << 20), at)
        if not data:
            break
        chunks.append(data)
        at += len(data)
    return b"".join(chunks)


def lay_out(store: ObjectStore, in_fd: int, listing_fd: int, size: int) -> str:
    """Fill `in/members/` from the listing copied into `listing_fd` (`size` bytes); returns the
    directory's name in in/. Raises MembersError, ObjectError (a member missing or damaged), OSError."""
    try:
        members = gathering.parse_listing(_read_all(listing_fd, size))
    except (ValueError, UnicodeDecodeError) as e:
        raise MembersError(f"the gather task's input is not a member listing ({e}); run 'task-pipeline fsck'") from None
    clash = gathering.collisions(members)
    if clash:
        name, hashes = next(iter(clash.items()))
        more = f" (and {len(clash) - 1} more name(s))" if len(clash) > 1 else ""
        raise MembersError(
            f"{len(hashes)} different members are named '{name}' ({', '.join(h[:12] for h in hashes)}){more}; "
            f"INPUT_DIR holds one file per name: give the files distinct names where they are made "
            f"(e.g. with $INPUT_NAME or $RUNSET in them), or retire the older ones")
    bad = next((n for n, _ in members if gathering.unsafe_name(n)), None)
    if bad is not None:
        raise MembersError(f"member name {bad!r} cannot be a file name in INPUT_DIR")
    fsutil.make_dir(gathering.MEMBERS_DIR, 0o700, dir_fd=in_fd)
    dir_fd = fsutil.open_dir(gathering.MEMBERS_DIR, in_fd)
    try:
        for name, h in members:
            fd = os.open(name, FILE_FLAGS, 0o444, dir_fd=dir_fd)
            try:
                store.copy_to_fd(h, fd)
            except ObjectError as e:
                raise ObjectError(f"member '{name}': {e}", e.hash) from None
            finally:
                os.close(fd)
        os.fchmod(dir_fd, 0o500)  # read-only for the script: its members are inputs, not scratch
    finally:
        os.close(dir_fd)
    return gathering.MEMBERS_DIR
