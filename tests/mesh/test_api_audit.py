"""The audit trail through the API: ingest (exactly once), every filter, cursor pages,
export, stats numbers, the live stream; and the sidecar registry's stale flag."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.mesh.conftest import ControlPlane

# A day ago, whole seconds: inside the default 30-day retention of every restart.
T0 = float(int(time.time()) - 86400)


def event(n: int, tag: str, **over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "id": f"{tag}-{n}",
        "time": T0 + n,
        "app": f"{tag}-billing",
        "instance": "billing@h1",
        "service": "orders-db",
        "session": "s1",
        "protocol": "postgres",
        "decision": "allow",
        "action": "allow",
        "enforced": True,
        "rules": [],
        "rule": None,
        "verbs": ["SELECT"],
        "tables": ["orders"],
        "statement": "SELECT * FROM orders WHERE id = $1",
        "duration_ms": 0.5,
        "rows": 1,
        "error": None,
        "policy_version": 1,
        "would": None,
        # HTTP requests only
        "method": None,
        "host": None,
        "path": None,
        "status": None,
        "bytes_in": None,
        "bytes_out": None,
    }
    e.update(over)
    return e


def ingest(c: httpx.Client, events: list[dict[str, Any]]) -> dict[str, int]:
    r = c.post("/v1/audit/events", json={"events": events})
    assert r.status_code == 200, r.text
    out: dict[str, int] = r.json()
    return out


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def loaded(admin: httpx.Client, tag: str) -> list[dict[str, Any]]:
    """20 events of one (unique) app: 10 SELECT, 6 INSERT on two tables, 4 denied DROPs."""
    evs = [event(n, tag) for n in range(10)]
    evs += [
        event(n, tag, verbs=["INSERT"], tables=[["orders"], ["order_items"]][n % 2], rows=None)
        for n in range(10, 16)
    ]
    evs += [
        event(
            n,
            tag,
            decision="deny",
            action="deny",
            verbs=["DROP", "ALTER"],
            tables=["orders"],
            rules=["guard/no-drop"],
            rule="guard/no-drop",
            statement="ALTER TABLE orders DROP COLUMN note",
            instance="billing@h2",
            service="orders-db-replica",
        )
        for n in range(16, 20)
    ]
    assert ingest(admin, evs) == {"accepted": 20, "duplicates": 0}
    return evs


def ids(c: httpx.Client, **params: Any) -> list[str]:
    r = c.get("/v1/audit/events", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return [e["id"] for e in r.json()["events"]]


def test_ingest_round_trips_and_drops_duplicates(
    admin: httpx.Client, loaded: list[dict[str, Any]], tag: str
) -> None:
    again = ingest(admin, [*loaded[:5], event(99, tag)])
    assert again == {"accepted": 1, "duplicates": 5}
    assert ingest(admin, [event(100, tag), event(100, tag)]) == {"accepted": 1, "duplicates": 1}
    got = admin.get("/v1/audit/events", params={"app": f"{tag}-billing", "limit": 1000}).json()
    assert len(got["events"]) == 22 and got["next_cursor"] is None
    by_id = {e["id"]: e for e in got["events"]}
    assert by_id[loaded[16]["id"]] == loaded[16]  # every field as sent


def test_http_event_fields_round_trip(admin: httpx.Client, tag: str) -> None:
    sent = {
        **event(7, tag),
        "protocol": "http",
        "verbs": ["POST"],
        "tables": [],
        "statement": "POST /v1/payments",
        "method": "POST",
        "host": "payments:8080",
        "path": "/v1/payments",
        "status": 403,
        "bytes_in": 120,
        "bytes_out": 210,
    }
    assert ingest(admin, [sent]) == {"accepted": 1, "duplicates": 0}
    got = admin.get("/v1/audit/events", params={"app": f"{tag}-billing", "verb": "POST"}).json()
    (stored,) = [e for e in got["events"] if e["id"] == sent["id"]]
    assert stored == sent


def test_dry_run_verdict_round_trips_and_older_events_default_it(
    admin: httpx.Client, tag: str
) -> None:
    older = event(1, tag)
    for field in ("would", "method", "host", "path", "status", "bytes_in", "bytes_out"):
        del older[field]  # a sidecar from before the fields
    dry = event(2, tag, decision="allow", action="limit", enforced=False, would="reject")
    assert ingest(admin, [older, dry]) == {"accepted": 2, "duplicates": 0}
    got = admin.get("/v1/audit/events", params={"app": f"{tag}-billing"}).json()["events"]
    assert {e["id"]: e["would"] for e in got} == {older["id"]: None, dry["id"]: "reject"}
    assert [e for e in got if e["id"] == dry["id"]] == [dry]
    r = admin.post("/v1/audit/events", json={"events": [event(3, tag, would=3)]})
    assert r.status_code == 422 and "would" in r.text


def test_every_filter(admin: httpx.Client, loaded: list[dict[str, Any]], tag: str) -> None:
    app = f"{tag}-billing"
    newest_first = [f"{tag}-{n}" for n in range(19, -1, -1)]
    assert ids(admin, app=app) == newest_first
    assert ids(admin, app=app, since=T0 + 5, until=T0 + 8) == [f"{tag}-{n}" for n in (7, 6, 5)]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0 + 18))
    assert ids(admin, app=app, since=iso) == [f"{tag}-19", f"{tag}-18"]
    assert len(ids(admin, app=app, instance="billing@h2")) == 4
    assert len(ids(admin, app=app, service="orders-db-replica")) == 4
    assert len(ids(admin, app=app, service="orders-db")) == 16
    assert len(ids(admin, app=app, decision="deny")) == 4
    assert len(ids(admin, app=app, verb="INSERT")) == 6
    assert len(ids(admin, app=app, verb="DROP")) == 4
    assert len(ids(admin, app=app, verb="ALTER")) == 4
    assert ids(admin, app=app, verb="DRO") == []  # exact, not a substring
    assert len(ids(admin, app=app, table="order_items")) == 3
    assert len(ids(admin, app=app, table="orders")) == 17
    assert ids(admin, app=app, table="order") == []
    assert len(ids(admin, app=app, rule="guard/no-drop")) == 4
    assert len(ids(admin, app=app, q="DROP COLUMN")) == 4
    assert ids(admin, app=app, q="drop column") == []  # case-sensitive substring
    assert ids(admin, app=app, verb="INSERT", table="order_items", decision="allow") == [
        f"{tag}-15",
        f"{tag}-13",
        f"{tag}-11",
    ]
    for bad in ({"since": "yesterday"}, {"limit": 0}, {"limit": 1001}, {"cursor": "!!"}):
        r = admin.get("/v1/audit/events", params=bad)
        assert r.status_code == 422, bad
        assert set(r.json()) == {"error", "detail"}


def test_cursor_pages(admin: httpx.Client, loaded: list[dict[str, Any]], tag: str) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"app": f"{tag}-billing", "limit": 6, **({"cursor": cursor} if cursor else {})}
        page = admin.get("/v1/audit/events", params=params).json()
        seen += [e["id"] for e in page["events"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 4
    assert seen == [f"{tag}-{n}" for n in range(19, -1, -1)]


def test_export_is_ndjson_oldest_first(
    admin: httpx.Client, loaded: list[dict[str, Any]], tag: str
) -> None:
    r = admin.get("/v1/audit/export", params={"app": f"{tag}-billing"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines == loaded


def test_export_of_many_pages(admin: httpx.Client, tag: str) -> None:
    evs = [event(n, tag, time=T0 + n / 1000) for n in range(2500)]
    assert ingest(admin, evs)["accepted"] == 2500
    r = admin.get("/v1/audit/export", params={"app": f"{tag}-billing"})
    assert [json.loads(x)["id"] for x in r.text.splitlines()] == [e["id"] for e in evs]


def test_stats(admin: httpx.Client, loaded: list[dict[str, Any]], tag: str) -> None:
    app = f"{tag}-billing"
    r = admin.get(
        "/v1/stats",
        params={"window": "20s", "until": T0 + 20, "app": app, "verb": "INSERT"},
    )
    body = r.json()
    assert body["window"] == 20 and body["since"] == T0 and body["until"] == T0 + 20
    assert body["groups"] == [{"key": {}, "count": 6, "per_second": 0.3}]
    r = admin.get(
        "/v1/stats",
        params={"window": "10s", "until": T0 + 20, "app": app, "group_by": "decision,verb"},
    )
    assert r.json()["groups"] == [
        {"key": {"decision": "allow", "verb": "INSERT"}, "count": 6, "per_second": 0.6},
        {"key": {"decision": "deny", "verb": "ALTER"}, "count": 4, "per_second": 0.4},
        {"key": {"decision": "deny", "verb": "DROP"}, "count": 4, "per_second": 0.4},
    ]
    r = admin.get(
        "/v1/stats", params={"window": "1m", "until": T0 + 60, "app": app, "group_by": "table"}
    )
    assert {g["key"]["table"]: g["count"] for g in r.json()["groups"]} == {
        "orders": 17,
        "order_items": 3,
    }
    assert admin.get("/v1/stats", params={"group_by": "colour"}).status_code == 422
    assert admin.get("/v1/stats", params={"window": "0s"}).status_code == 422
    assert admin.get("/v1/stats", params={"window": "soon"}).status_code == 422


def test_bad_events_store_nothing(admin: httpx.Client, tag: str) -> None:
    cases = [
        ({"id": "x"}, "events[1].app: required field missing"),
        (event(1, tag, time="now"), "events[1].time: expected a number"),
        (event(1, tag, verbs="SELECT"), "events[1].verbs: expected a list of strings"),
        (event(1, tag, rows=2**70), "events[1].rows: integer out of range"),
        (event(1, tag, enforced="yes"), "events[1].enforced: expected true or false"),
        (event(1, tag, id=""), "events[1].id: expected 1 to 256 characters"),
        ("nope", "events[1]: expected a JSON object"),
    ]
    for bad, why in cases:
        r = admin.post("/v1/audit/events", json={"events": [event(0, tag), bad]})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(why), r.json()
    assert ids(admin, app=f"{tag}-billing") == []
    r = admin.post("/v1/audit/events", json={"events": [event(n, tag) for n in range(5001)]})
    assert r.status_code == 413 and "5000" in r.json()["detail"]
    r = admin.post(
        "/v1/audit/events",
        content=b'{"events": [{"id": "n", "time": NaN}]}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422


def test_stream_receives_ingested_events(
    control: ControlPlane, admin: httpx.Client, tag: str
) -> None:
    received: list[dict[str, Any]] = []
    subscribed = threading.Event()

    def listen() -> None:
        with (
            control.client() as c,
            c.stream(
                "GET", "/v1/audit/stream", params={"app": f"{tag}-billing", "verb": "INSERT"}
            ) as r,
        ):
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(":"):
                    subscribed.set()
                if line.startswith("data: "):
                    received.append(json.loads(line[6:]))
                    if len(received) == 2:
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert subscribed.wait(5)
    ingest(admin, [event(1, tag), event(2, tag, verbs=["INSERT"]), event(3, "other")])
    ingest(admin, [event(2, tag, verbs=["INSERT"]), event(4, tag, verbs=["INSERT"])])
    t.join(5)
    assert [e["id"] for e in received] == [f"{tag}-2", f"{tag}-4"]


def test_sidecars_register_and_go_stale(
    control: ControlPlane, admin: httpx.Client, tag: str
) -> None:
    instance = f"{tag}@host"
    body = {
        "app": "billing",
        "instance": instance,
        "hostname": "host",
        "pid": 123,
        "routes": [
            {
                "service": "orders-db",
                "protocol": "postgres",
                "listen": "127.0.0.1:6432",
                "upstream": "127.0.0.1:5432",
            }
        ],
        "policy_version": 3,
        "audit": {"spooled": 2, "dropped": 0},
    }
    r = admin.put(f"/v1/sidecars/{instance}", json=body)
    assert r.json() == {"registered": True, "heartbeat_interval": 0.5}
    mine = [s for s in admin.get("/v1/sidecars").json()["sidecars"] if s["instance"] == instance]
    assert len(mine) == 1 and mine[0]["stale"] is False
    assert {k: mine[0][k] for k in body} == body
    time.sleep(1.7)  # 3 heartbeat intervals of 0.5 s
    mine = [s for s in admin.get("/v1/sidecars").json()["sidecars"] if s["instance"] == instance]
    assert mine[0]["stale"] is True
    admin.put(f"/v1/sidecars/{instance}", json=body)
    mine = [s for s in admin.get("/v1/sidecars").json()["sidecars"] if s["instance"] == instance]
    assert mine[0]["stale"] is False
    r = admin.put(f"/v1/sidecars/{instance}", json={**body, "instance": "other"})
    assert r.status_code == 422 and "differs" in r.json()["detail"]
    assert admin.put(f"/v1/sidecars/{instance}", json={"pid": 1}).status_code == 422
