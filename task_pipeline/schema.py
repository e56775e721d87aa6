"""The database schema, in one place, as numbered migrations, for every backend.

A store records its schema version in `meta`. Opening a store applies the
migrations it lacks, in order, in one transaction; a store whose version is
newer than the last migration here was written by a newer task-pipeline and is
refused rather than guessed at.

The SQL is written once. The few types that differ between SQLite and
PostgreSQL are named in braces and filled in by the driver (`Dialect.types`):
{id} an auto-numbered 64-bit primary key, {ref} a column that refers to one,
{int} a 64-bit integer, {real} a double, {without_rowid} SQLite's table option.

Vocabulary:
- step: one version of a step definition; (name, identity) is unique.
- step_current: the manifest as last registered: which version of each step
  is current, what it consumes, its policy (parallel, retries, timeout,
  schedule) and whether it is a start step. Runners work from this table, not
  from a manifest file, so that every process on the store agrees.
- task: one step version applied to one input. Identity is
  (step_id, input_name, input_hash, seed); seed is the runset for start tasks
  and '' otherwise. `live = 0` means superseded: kept as history, not current.
  state 'running' means leased by a runner; `started_at` is set once its
  script has actually started (so that status counts scripts, not leases).
- output: the files a done task produced, by name and object hash.
- attempt: every execution of a task, with its exit status and log objects.
- runner: processes working on (or writing to) this store: runners, daemons,
  and short-lived writers such as submit, so that gc sees them all.
- gather_member: the members of a gather task (gathering.py), by name and object
  hash. The task's input object lists them too, but gc and fsck read references
  from the database, and `why` and `graph` follow a fan-in through this table.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) {without_rowid};

    CREATE TABLE step (
        id         {id},
        name       TEXT NOT NULL,
        version    {int} NOT NULL,
        identity   TEXT NOT NULL,
        script     TEXT NOT NULL,
        shell      TEXT NOT NULL,
        env        TEXT NOT NULL,
        created_at {real} NOT NULL,
        UNIQUE (name, version),
        UNIQUE (name, identity)
    );

    CREATE TABLE step_current (
        name        TEXT PRIMARY KEY,
        step_id     {ref} NOT NULL REFERENCES step(id),
        consumes    TEXT NOT NULL,
        policy      TEXT NOT NULL,
        is_start    {int} NOT NULL,
        in_manifest {int} NOT NULL DEFAULT 1,
        position    {int} NOT NULL DEFAULT 0
    ) {without_rowid};

    CREATE TABLE object (
        hash TEXT PRIMARY KEY,
        size {int} NOT NULL
    ) {without_rowid};

    CREATE TABLE task (
        id            {id},
        step_id       {ref} NOT NULL REFERENCES step(id),
        input_name    TEXT NOT NULL,
        input_hash    TEXT NOT NULL,
        seed          TEXT NOT NULL DEFAULT '',
        runset        TEXT NOT NULL DEFAULT '',
        parent_id     {ref},
        replaces      {ref},
        state         TEXT NOT NULL DEFAULT 'pending',
        live          {int} NOT NULL DEFAULT 1,
        attempts      {int} NOT NULL DEFAULT 0,
        not_before    {real} NOT NULL DEFAULT 0,
        token         {int} NOT NULL DEFAULT 0,
        lease_owner   TEXT,
        lease_expires {real},
        exit_code     {int},
        error         TEXT,
        created_at    {real} NOT NULL,
        finished_at   {real},
        UNIQUE (step_id, input_name, input_hash, seed)
    );
    CREATE INDEX task_queue   ON task(step_id, id) WHERE state = 'pending' AND live = 1;
    CREATE INDEX task_running ON task(lease_owner) WHERE state = 'running';
    CREATE INDEX task_counts  ON task(step_id, state, live);
    CREATE INDEX task_input   ON task(input_hash, input_name);
    CREATE INDEX task_parent  ON task(parent_id);

    CREATE TABLE output (
        task_id {ref} NOT NULL REFERENCES task(id),
        name    TEXT NOT NULL,
        hash    TEXT NOT NULL,
        key     TEXT NOT NULL,
        PRIMARY KEY (task_id, name)
    ) {without_rowid};
    CREATE INDEX output_hash ON output(hash, name);
    CREATE INDEX output_key  ON output(key);

    CREATE TABLE attempt (
        id          {id},
        task_id     {ref} NOT NULL REFERENCES task(id),
        attempt     {int} NOT NULL,
        runner      TEXT NOT NULL,
        started_at  {real},
        finished_at {real},
        outcome     TEXT NOT NULL,
        exit_code   {int},
        error       TEXT,
        stdout_hash TEXT,
        stderr_hash TEXT
    );
    CREATE INDEX attempt_task ON attempt(task_id);

    CREATE TABLE runner (
        id         TEXT PRIMARY KEY,
        host       TEXT NOT NULL,
        pid        {int} NOT NULL,
        kind       TEXT NOT NULL,
        started_at {real} NOT NULL,
        heartbeat  {real} NOT NULL
    ) {without_rowid};
    """,
    # 2: when a leased task's script really started (status counts running scripts, not leases)
    """
    ALTER TABLE task ADD COLUMN started_at {real};
    """,
    # 3: gather steps: the members of each gather task (kept as references for gc, and for why and graph)
    """
    CREATE TABLE gather_member (
        task_id {ref} NOT NULL REFERENCES task(id),
        name    TEXT NOT NULL,
        hash    TEXT NOT NULL,
        PRIMARY KEY (task_id, name, hash)
    ) {without_rowid};
    CREATE INDEX gather_member_hash ON gather_member(hash, name);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def statements(migration: str, types: dict[str, str]) -> list[str]:
    """The statements of one migration, with the driver's types filled in."""
    return [s.strip() for s in migration.format(**types).split(";") if s.strip()]
