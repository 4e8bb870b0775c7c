"""A limit keyed by table (`limit.key: table`) through the PostgreSQL sidecar and the real
server: each table has its own bucket, a statement on two tables takes a token from each
(all or none), and, with a control plane, the per-table keys are leased mesh-wide."""

from __future__ import annotations

import secrets
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from sidecar.config import ControlConfig, Route, SidecarConfig
from tests.mesh.conftest import ControlPlane
from tests.promtext import parse, value
from tests.sidecar.conftest import PG_HOST, PG_PORT, RunningSidecar

pytestmark = pytest.mark.postgres


def policy(per: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: sluice/v1
        kind: Policy
        metadata: {{name: keyed}}
        spec:
          destination: orders-db
          rules:
            - name: per-table
              from: [billing]
              sql: {{verbs: [INSERT], tables: [qa, qb, qc]}}
              action: limit
              limit: {{rate: 3, per: {per}, burst: 3, scope: source-app, key: table}}
              message: one table at a time
        """
    )


@pytest.fixture
def db(scratch_db: str) -> str:
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user="postgres", dbname=scratch_db, autocommit=True
    ) as c:
        for t in ("qa", "qb", "qc"):
            c.execute(f"DROP TABLE IF EXISTS {t}")
            c.execute(f"CREATE TABLE {t} (id int)")
    return scratch_db


def attempt(c: psycopg.Connection[tuple[object, ...]], sql: str) -> str | None:
    """None when the statement ran, else the sidecar's rejection message."""
    try:
        c.execute(sql)
    except errors.ConfigurationLimitExceeded as exc:
        return exc.diag.message_primary or ""
    return None


def rows(db: str, table: str) -> int:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname=db) as c:
        row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_two_tables_are_limited_independently(
    start_sidecar: Callable[..., RunningSidecar], db: str
) -> None:
    sc = start_sidecar(policy("1h"))  # refills are negligible within the test
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:  # type: ignore[arg-type]
        assert [attempt(c, "INSERT INTO qa VALUES (1)") for _ in range(3)] == [None] * 3
        assert attempt(c, "INSERT INTO qa VALUES (1)") == (
            "sluice: rate limit keyed/per-table exceeded for table qa (3 per 3600s): "
            "one table at a time"
        )
        # qa's bucket is empty; qb's is untouched.
        assert [attempt(c, "INSERT INTO qb VALUES (1)") for _ in range(2)] == [None] * 2
        # qb and qc: a token from each. Then qc with qa: qa is empty, so nothing is taken.
        assert attempt(c, "INSERT INTO qc SELECT id FROM qb LIMIT 1") is None
        assert attempt(c, "INSERT INTO qc SELECT id FROM qa LIMIT 1") == (
            "sluice: rate limit keyed/per-table exceeded for table qa (3 per 3600s): "
            "one table at a time"
        )
        assert attempt(c, "INSERT INTO qb VALUES (1)") is not None  # qb: 3 taken
        assert [attempt(c, "INSERT INTO qc VALUES (1)") for _ in range(3)] == [
            None,
            None,
            (
                "sluice: rate limit keyed/per-table exceeded for table qc (3 per 3600s): "
                "one table at a time"
            ),
        ]
    assert (rows(db, "qa"), rows(db, "qb"), rows(db, "qc")) == (3, 2, 3)
    limited = [e for e in sc.events() if e.decision == "reject"]
    assert [e.tables for e in limited] == [("qa",), ("qa", "qc"), ("qb",), ("qc",)]


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "cp", "--no-dns").start()
    yield cp
    cp.stop()


def drain(c: psycopg.Connection[tuple[object, ...]], table: str, seconds: float = 2.0) -> int:
    """INSERTs into `table` for `seconds` (leases arrive over time); how many ran."""
    ran = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if attempt(c, f"INSERT INTO {table} VALUES (1)") is None:
            ran += 1
        time.sleep(0.01)
    return ran


def test_per_table_keys_are_leased_from_the_control_plane(
    plane: ControlPlane, db: str, tmp_path: Path
) -> None:
    with plane.client() as admin:
        r = admin.post("/v1/tokens", json={"role": "sidecar", "name": f"k-{secrets.token_hex(3)}"})
        token = r.json()["token"]
        r = admin.post("/v1/policies", json={"files": {"keyed.yaml": policy("1h")}})
        assert r.status_code == 201, r.text
    route = Route("orders-db", "postgres", ("127.0.0.1", 0), (PG_HOST, PG_PORT), 3.0)
    control = ControlConfig(plane.url, token, str(tmp_path / "state"))
    config = SidecarConfig("billing", "billing-1", (), (route,), control=control)
    sc = RunningSidecar(config, tmp_path / "unused.yaml")
    try:
        deadline = time.monotonic() + 10
        while sc.sidecar is None or sc.sidecar.policy_version() != 1:
            assert time.monotonic() < deadline, "the sidecar did not get the policy"
            time.sleep(0.05)
        with psycopg.connect(**sc.dsn(db), autocommit=True) as c:  # type: ignore[arg-type]
            # Each table's mesh-wide bucket holds its burst of 3, granted a token per lease.
            assert drain(c, "qa") == 3
            assert drain(c, "qb") == 3
            assert attempt(c, "INSERT INTO qa VALUES (1)") is not None
        with plane.client("") as anonymous:
            samples, _ = parse(anonymous.get("/metrics").text)
        assert value(samples, "sluice_quota_active_keys", rule="keyed/per-table") == 2
        assert value(samples, "sluice_quota_tokens_granted_total", rule="keyed/per-table") == 6
    finally:
        sc.stop()
    assert (rows(db, "qa"), rows(db, "qb")) == (3, 3)
