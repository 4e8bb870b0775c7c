"""The stores without the server: the event schema matches the sidecar's AuditEvent, the
schema migrates once, and the in-memory filter (live stream) agrees with the SQL one."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from mesh.store import Stores
from mesh.store.audit import NAMES, AuditFilter
from mesh.store.db import MIGRATIONS
from sidecar.audit import AuditEvent
from tests.mesh.test_api_audit import event


def test_fields_are_the_sidecars_audit_event() -> None:
    assert tuple(f.name for f in dataclasses.fields(AuditEvent)) == NAMES


def test_a_sidecar_event_round_trips(tmp_path: Path) -> None:
    e = AuditEvent(
        "i-1-1", 1.5, "billing", "i", "orders-db", "s", "postgres", "deny", "deny", True,
        ("g/r",), "g/r", ("DROP",), ("t",), "DROP TABLE t", 0.2, None, "42501", 3, "delay",
    )  # fmt: skip
    stores = Stores.open(tmp_path)
    fresh, dups = stores.audit.ingest([json.loads(e.to_json())])
    assert (len(fresh), dups) == (1, 0)
    got, _ = stores.audit.query(AuditFilter())
    assert got == [json.loads(e.to_json())]
    stores.close()


def test_migrations_run_once(tmp_path: Path) -> None:
    Stores.open(tmp_path).close()
    stores = Stores.open(tmp_path)
    assert stores.db.schema_version == len(MIGRATIONS)
    stores.close()
    conn = sqlite3.connect(tmp_path / "control.db")
    assert conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


FILTERS = [
    AuditFilter(),
    AuditFilter(verb="INSERT"),
    AuditFilter(table="order_items", decision="allow"),
    AuditFilter(rule="guard/no-drop", instance="billing@h2"),
    AuditFilter(q="DROP", service="orders-db-replica"),
    AuditFilter(since=1005, until=1012),
]


@pytest.mark.parametrize("filt", FILTERS, ids=str)
def test_memory_filter_agrees_with_sql(tmp_path: Path, filt: AuditFilter) -> None:
    stores = Stores.open(tmp_path)
    evs = [event(n, "m", time=1000 + n) for n in range(10)]
    evs += [
        event(n, "m", time=1000 + n, verbs=["INSERT"], tables=["order_items"])
        for n in range(10, 15)
    ]
    evs += [
        event(n, "m", time=1000 + n, decision="deny", rules=["guard/no-drop"], instance="billing@h2",
              service="orders-db-replica", statement="DROP TABLE orders")
        for n in range(15, 20)
    ]  # fmt: skip
    stores.audit.ingest(evs)
    in_sql = [e["id"] for e in stores.audit.query(filt, limit=1000)[0]]
    in_memory = [e["id"] for e in reversed(evs) if filt.matches(e)]
    assert in_sql == in_memory
    stores.close()
