"""The catalog's durable part in control.db: service registrations, KV entries, the index.

Synchronous (the runtime calls it from worker threads, one write at a time). What is kept:
each registration as sent (normalised), each KV entry with its indexes, and the highest
index written. What is not: check statuses. After a restart every check starts at its
registered initial status (critical unless the registration said otherwise), as a Consul
agent does for checks it has not run yet: TTL checks must be passed again, TCP and HTTP
checks run at once. The index restarts above the highest one stored.
"""

from __future__ import annotations

import json

from mesh.catalog.model import KvEntry, Model
from mesh.catalog.parse import BadRequest, service_from_json
from mesh.store.db import Database


class CatalogStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def load(self, model: Model, now: float) -> int:
        """Fill `model` from the database; returns the number of registrations loaded."""
        with self.db.reading() as conn:
            services = conn.execute("SELECT id, body FROM catalog_services ORDER BY id").fetchall()
            kv = conn.execute(
                "SELECT key, value, flags, create_index, modify_index FROM catalog_kv"
            ).fetchall()
            row = conn.execute("SELECT value FROM catalog_meta WHERE name = 'index'").fetchone()
        stored = int(row[0]) if row else 1
        top = max([stored, *(int(r[4]) for r in kv)])
        model.index = top
        loaded = 0
        for _id, body in services:
            try:
                model.register(service_from_json(json.loads(body)), now)
                loaded += 1
            except (BadRequest, ValueError):  # a row this version cannot read: skip it
                continue
        for key, value, flags, created, modified in kv:
            model.kv[key] = KvEntry(key, bytes(value), int(flags), int(created), int(modified))
        model.index += 1
        model.services_index = model.kv_index = model.index
        return loaded

    def save_service(self, body: dict[str, object], index: int) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO catalog_services (id, body) VALUES (?, ?)",
                (body["ID"], json.dumps(body)),
            )
            self._index(conn, index)

    def delete_service(self, service_id: str, index: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM catalog_services WHERE id = ?", (service_id,))
            self._index(conn, index)

    def save_kv(self, entry: KvEntry) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO catalog_kv VALUES (?, ?, ?, ?, ?)",
                (entry.key, entry.value, entry.flags, entry.create_index, entry.modify_index),
            )
            self._index(conn, entry.modify_index)

    def delete_kv(self, keys: list[str], index: int) -> None:
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM catalog_kv WHERE key = ?", [(k,) for k in keys])
            self._index(conn, index)

    @staticmethod
    def _index(conn: object, index: int) -> None:
        import sqlite3

        assert isinstance(conn, sqlite3.Connection)
        conn.execute(
            "INSERT INTO catalog_meta (name, value) VALUES ('index', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
            (index,),
        )
