"""The database schema, in one place, as numbered migrations.

A store records its schema version in `meta`. Opening a store applies the
migrations it lacks, in order, each in its own transaction; a store whose
version is newer than the last migration here was written by a newer
task-pipeline and is refused rather than guessed at.

Vocabulary:
- step: one version of a step definition; (name, identity) is unique.
- step_current: the manifest as last registered: which version of each step
  is current, what it consumes, its policy (parallel, retries, timeout,
  schedule) and whether it is a start step. Runners work from this table, not
  from a manifest file, so that every process on the store agrees.
- task: one step version applied to one input. Identity is
  (step_id, input_name, input_hash, seed); seed is the runset for start tasks
  and '' otherwise. `live = 0` means superseded: kept as history, not current.
- output: the files a done task produced, by name and object hash.
- attempt: every execution of a task, with its exit status and log objects.
- runner: processes working on this store (for leases and status).
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE step (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL,
        version    INTEGER NOT NULL,
        identity   TEXT NOT NULL,
        script     TEXT NOT NULL,
        shell      TEXT NOT NULL,
        env        TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (name, version),
        UNIQUE (name, identity)
    );

    CREATE TABLE step_current (
        name        TEXT PRIMARY KEY,
        step_id     INTEGER NOT NULL REFERENCES step(id),
        consumes    TEXT NOT NULL,
        policy      TEXT NOT NULL,
        is_start    INTEGER NOT NULL,
        in_manifest INTEGER NOT NULL DEFAULT 1,
        position    INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    CREATE TABLE object (
        hash TEXT PRIMARY KEY,
        size INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE task (
        id            INTEGER PRIMARY KEY,
        step_id       INTEGER NOT NULL REFERENCES step(id),
        input_name    TEXT NOT NULL,
        input_hash    TEXT NOT NULL,
        seed          TEXT NOT NULL DEFAULT '',
        runset        TEXT NOT NULL DEFAULT '',
        parent_id     INTEGER,
        replaces      INTEGER,
        state         TEXT NOT NULL DEFAULT 'pending',
        live          INTEGER NOT NULL DEFAULT 1,
        attempts      INTEGER NOT NULL DEFAULT 0,
        not_before    REAL NOT NULL DEFAULT 0,
        token         INTEGER NOT NULL DEFAULT 0,
        lease_owner   TEXT,
        lease_expires REAL,
        exit_code     INTEGER,
        error         TEXT,
        created_at    REAL NOT NULL,
        finished_at   REAL,
        UNIQUE (step_id, input_name, input_hash, seed)
    );
    CREATE INDEX task_queue   ON task(step_id, id) WHERE state = 'pending' AND live = 1;
    CREATE INDEX task_running ON task(lease_owner) WHERE state = 'running';
    CREATE INDEX task_counts  ON task(step_id, state, live);
    CREATE INDEX task_input   ON task(input_hash, input_name);
    CREATE INDEX task_parent  ON task(parent_id);

    CREATE TABLE output (
        task_id INTEGER NOT NULL REFERENCES task(id),
        name    TEXT NOT NULL,
        hash    TEXT NOT NULL,
        key     TEXT NOT NULL,
        PRIMARY KEY (task_id, name)
    ) WITHOUT ROWID;
    CREATE INDEX output_hash ON output(hash, name);
    CREATE INDEX output_key  ON output(key);

    CREATE TABLE attempt (
        id          INTEGER PRIMARY KEY,
        task_id     INTEGER NOT NULL REFERENCES task(id),
        attempt     INTEGER NOT NULL,
        runner      TEXT NOT NULL,
        started_at  REAL,
        finished_at REAL,
        outcome     TEXT NOT NULL,
        exit_code   INTEGER,
        error       TEXT,
        stdout_hash TEXT,
        stderr_hash TEXT
    );
    CREATE INDEX attempt_task ON attempt(task_id);

    CREATE TABLE runner (
        id         TEXT PRIMARY KEY,
        host       TEXT NOT NULL,
        pid        INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat  REAL NOT NULL
    ) WITHOUT ROWID;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
