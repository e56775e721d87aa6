"""Where a store lives: one way to name it, the same in every command, the environment and NixOS.

A store has three parts:

- the database (`-db`): a store directory (SQLite in DB_DIR/db), or a
  `postgresql://user@host/dbname` URL shared by runners on many hosts;
- the objects (`--objects`): a directory (DB_DIR/objects by default; with
  PostgreSQL, a directory every host reaches, such as an NFS mount), or an S3
  bucket, `s3://bucket/prefix` (see s3store.py for credentials and endpoints);
- the scratch space (`--scratch`): where running scripts work, always local to
  the host (DB_DIR/tmp by default; with PostgreSQL, /var/tmp/task-pipeline-UID).

Each flag has an environment variable of the same meaning (TASK_PIPELINE_DB,
TASK_PIPELINE_OBJECTS, TASK_PIPELINE_SCRATCH); a flag wins over the variable.
A PostgreSQL password comes from TASK_PIPELINE_DB_PASSWORD_FILE (a file holding
just the password), from libpq's own PGPASSFILE/~/.pgpass, or from the URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from task_pipeline.db import is_url
from task_pipeline.errors import UsageError


def parse_size(text: str, what: str) -> int:
    """A size such as 500M, 10G or 2.5GiB, in bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise UsageError(f"{what} {text}: not a size; write e.g. 500M or 10G")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))

ENV_DB = "TASK_PIPELINE_DB"
ENV_OBJECTS = "TASK_PIPELINE_OBJECTS"
ENV_SCRATCH = "TASK_PIPELINE_SCRATCH"
ENV_PASSWORD_FILE = "TASK_PIPELINE_DB_PASSWORD_FILE"
SECRET_ENV = (ENV_PASSWORD_FILE, "PGPASSWORD")  # not passed on to scripts


@dataclass(frozen=True)
class Location:
    db: str                    # a directory, or a postgresql:// URL
    objects: Path
    scratch: Path
    incoming: Path             # objects being written, on the objects' filesystem
    password_file: str | None = None
    bucket: str | None = None  # s3://bucket/prefix when the objects are in S3 (then `objects` is unused)

    @property
    def shared(self) -> bool:
        """A database other hosts may use too (so pids and local clocks are not to be trusted)."""
        return is_url(self.db)

    def describe(self) -> str:
        if not self.shared:
            return self.db
        from task_pipeline.db.postgres import redact

        return f"{redact(self.db)} (objects {self.bucket or self.objects})"


def resolve(db: str | None = None, objects: str | None = None, scratch: str | None = None,
            env: dict | None = None) -> Location:
    env = os.environ if env is None else env
    db = db if db is not None else env.get(ENV_DB) or "./db"
    objects = objects if objects is not None else env.get(ENV_OBJECTS) or None
    scratch = scratch if scratch is not None else env.get(ENV_SCRATCH) or None
    for flag, value in (("-db", db), ("--objects", objects), ("--scratch", scratch)):
        if value is not None and (not value.strip() or "\0" in value):
            raise UsageError(f"{flag} is empty; give a directory" + (" or a postgresql:// URL" if flag == "-db" else ""))
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{flag} {value.encode('utf-8', 'surrogateescape')!r}: not UTF-8; use a path "
                                 f"that is") from None
    password_file = env.get(ENV_PASSWORD_FILE) or None
    bucket = None
    if objects is not None and "://" in objects:
        if not objects.startswith("s3://"):
            raise UsageError(f"--objects {objects}: give a directory or an S3 bucket (s3://bucket/prefix)")
        bucket, objects = objects.rstrip("/"), None
    if is_url(db):
        if objects is None and bucket is None:
            raise UsageError(f"a PostgreSQL store needs its objects directory too: add --objects DIR (a directory "
                             f"every host reaches), or set {ENV_OBJECTS}")
        scr = Path(scratch).absolute() if scratch else Path("/var/tmp") / f"task-pipeline-{os.geteuid()}"
        obj = Path(objects).absolute() if objects else scr / "objects-unused"
        return Location(db, obj, scr, obj / "incoming", password_file, bucket)
    if db.startswith(("sqlite:", "mysql:", "s3:", "http:", "https:")) or "://" in db:
        raise UsageError(f"-db {db}: not a store directory or a postgresql:// URL")
    root = Path(db)
    obj = Path(objects) if objects else root / "objects"
    scr = Path(scratch) if scratch else root / "tmp"
    incoming = root / "tmp" if not objects else obj / "incoming"
    return Location(db, obj, scr, incoming, password_file, bucket)
