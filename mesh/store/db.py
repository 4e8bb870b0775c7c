"""The control plane's SQLite database: one file, WAL mode, a versioned schema.

All stores share one `Database`: one connection guarded by one lock, so a store method is
one short critical section and the stores can be called from any thread (the API runs them
in worker threads). The control plane is the only process that writes `control.db`.

Durability: WAL with `synchronous=FULL`, so a commit that returned is on disk; an audit
batch is acknowledged only after its commit (a kill -9 or a power cut loses nothing that
was acknowledged).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_FILE = "control.db"
# A writer waits this long for another connection's lock (only `sqlite3` shells, in practice).
BUSY_TIMEOUT_MS = 5000

# Each entry is one migration, applied once, in order; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    # 1: policies, tokens, sidecars, audit events with a side table for list fields.
    """
    CREATE TABLE policy_versions (
        version INTEGER PRIMARY KEY,
        created REAL NOT NULL,
        comment TEXT NOT NULL,
        author TEXT NOT NULL,
        policies INTEGER NOT NULL,
        rules INTEGER NOT NULL
    );
    CREATE TABLE policy_files (
        version INTEGER NOT NULL REFERENCES policy_versions(version),
        name TEXT NOT NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (version, name)
    ) WITHOUT ROWID;
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE TABLE sidecars (
        instance TEXT PRIMARY KEY,
        info TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    -- seq is the stable row id that event_tags points at (VACUUM keeps INTEGER PRIMARY KEY).
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        time REAL NOT NULL,
        app TEXT NOT NULL,
        instance TEXT NOT NULL,
        service TEXT NOT NULL,
        session TEXT NOT NULL,
        protocol TEXT NOT NULL,
        decision TEXT NOT NULL,
        action TEXT NOT NULL,
        enforced INTEGER NOT NULL,
        rules TEXT NOT NULL,
        rule TEXT,
        verbs TEXT NOT NULL,
        tables TEXT NOT NULL,
        statement TEXT NOT NULL,
        duration_ms REAL,
        rows INTEGER,
        error TEXT,
        policy_version INTEGER NOT NULL,
        received REAL NOT NULL
    );
    CREATE INDEX events_time ON events (time, id);
    CREATE INDEX events_app ON events (app, time);
    CREATE INDEX events_service ON events (service, time);
    CREATE INDEX events_instance ON events (instance, time);
    CREATE INDEX events_decision ON events (decision, time);
    -- One row per (event, verb | table | rule): filtering by one of them is an exact
    -- index lookup, with no LIKE over a JSON text.
    CREATE TABLE event_tags (
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        event INTEGER NOT NULL,
        PRIMARY KEY (kind, value, event)
    ) WITHOUT ROWID;
    CREATE INDEX event_tags_event ON event_tags (event);
    CREATE TRIGGER events_tag AFTER INSERT ON events BEGIN
        INSERT OR IGNORE INTO event_tags (kind, value, event)
            SELECT 'verb', value, NEW.seq FROM json_each(NEW.verbs);
        INSERT OR IGNORE INTO event_tags (kind, value, event)
            SELECT 'table', value, NEW.seq FROM json_each(NEW.tables);
        INSERT OR IGNORE INTO event_tags (kind, value, event)
            SELECT 'rule', value, NEW.seq FROM json_each(NEW.rules);
    END;
    """,
    # 2: the embedded service catalog (mesh/catalog): registrations, KV, its Raft-like index.
    """
    CREATE TABLE catalog_services (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE catalog_kv (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        flags INTEGER NOT NULL,
        create_index INTEGER NOT NULL,
        modify_index INTEGER NOT NULL
    );
    CREATE TABLE catalog_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # 3: what a dry-run limit rule would have done to the statement (reject | delay | NULL).
    """
    ALTER TABLE events ADD COLUMN would TEXT;
    """,
    # 4: HTTP requests: method, host, path, the response status and byte counts.
    """
    ALTER TABLE events ADD COLUMN method TEXT;
    ALTER TABLE events ADD COLUMN host TEXT;
    ALTER TABLE events ADD COLUMN path TEXT;
    ALTER TABLE events ADD COLUMN status INTEGER;
    ALTER TABLE events ADD COLUMN bytes_in INTEGER;
    ALTER TABLE events ADD COLUMN bytes_out INTEGER;
    """,
)


class Database:
    """One SQLite connection for the whole control plane, serialised by a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.schema_version = self._migrate()

    @classmethod
    def open(cls, data_dir: str | Path) -> Database:
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / DB_FILE)

    def _migrate(self) -> int:
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied REAL)"
            )
            row = conn.execute("SELECT max(version) FROM migrations").fetchone()
            current = int(row[0] or 0)
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {current}; this sluice knows "
                    f"{len(MIGRATIONS)}: use a newer sluice"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in _statements(MIGRATIONS[version - 1]):
                    conn.execute(statement)
                conn.execute("INSERT INTO migrations VALUES (?, ?)", (version, time.time()))
        return len(MIGRATIONS)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; ROLLBACK on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, for reads (each statement is its own snapshot)."""
        with self._lock:
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _statements(script: str) -> list[str]:
    """Split a migration into statements; a trigger body keeps its inner semicolons."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
