"""`GET /metrics` of a real `sluice up`: no token needed, Prometheus text that parses, and
counts that follow what was asked of the API (requests by route template and status,
audit events ingested and duplicates, policy version, live and stale sidecars)."""

from __future__ import annotations

import time

import httpx

from tests.mesh.conftest import ControlPlane, policy_text
from tests.mesh.test_api_audit import event
from tests.promtext import parse, value


def test_control_plane_metrics(fresh: ControlPlane) -> None:
    cp = fresh.start("--heartbeat-interval", "0.2")
    with cp.client() as admin, cp.client("") as anonymous:
        assert (
            admin.post("/v1/policies", json={"files": {"a.yaml": policy_text()}}).status_code == 201
        )
        assert admin.get("/v1/status").status_code == 200
        assert admin.get("/v1/status").status_code == 200
        assert anonymous.get("/v1/status").status_code == 401
        assert admin.get("/v1/policies/99").status_code == 404
        assert admin.get("/nowhere/12345").status_code == 404
        batch = [event(n, "metrics") for n in range(5)]
        assert admin.post("/v1/audit/events", json={"events": batch}).json() == {
            "accepted": 5,
            "duplicates": 0,
        }
        assert admin.post("/v1/audit/events", json={"events": batch[:2]}).json() == {
            "accepted": 0,
            "duplicates": 2,
        }
        assert admin.put("/v1/sidecars/old-1", json={"app": "billing"}).status_code == 200
        time.sleep(0.8)  # old-1 is stale after 3 intervals of 0.2 s
        assert admin.put("/v1/sidecars/new-1", json={"app": "billing"}).status_code == 200

        r = anonymous.get("/metrics")  # no token
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, types = parse(r.text)
    assert types["sluice_api_requests_total"] == "counter"
    assert types["sluice_api_request_duration_ms"] == "histogram"
    req = "sluice_api_requests_total"
    assert value(samples, req, route="/v1/status", method="GET", status="200") == 2
    assert value(samples, req, route="/v1/status", method="GET", status="401") == 1
    assert value(samples, req, route="/v1/policies/{version}", status="404") == 1
    assert value(samples, req, route="unmatched", status="404") == 1
    assert value(samples, req, route="/v1/audit/events", method="POST", status="200") == 2
    assert not any("12345" in dict(labels).get("route", "") for _, labels in samples)
    count = "sluice_api_request_duration_ms_count"
    assert value(samples, count, route="/v1/status", method="GET") == 3
    assert value(samples, "sluice_audit_events_ingested_total") == 5
    assert value(samples, "sluice_audit_duplicates_total") == 2
    assert value(samples, "sluice_audit_batches_total") == 2
    assert value(samples, "sluice_policy_version") == 1
    assert value(samples, "sluice_sidecars", state="live") == 1
    assert value(samples, "sluice_sidecars", state="stale") == 1
    assert "/metrics" not in httpx.get(cp.url + "/v1/openapi.json").json()["paths"]


def _lease(key: str, want: float, returned: float = 0.0) -> dict[str, object]:
    return {"key": key, "rate": 100, "per": 1, "burst": 10, "want": want, "returned": returned}


def test_quota_metrics_follow_lease_traffic(fresh: ControlPlane) -> None:
    cp = fresh.start()
    orders, items = "q/per-table|app=billing|table=orders", "q/per-table|app=billing|table=items"
    flat = "q/flat|app=billing"
    with cp.client() as admin, cp.client("") as anonymous:
        samples, types = parse(anonymous.get("/metrics").text)
        assert types["sluice_quota_leases_total"] == "counter"
        assert types["sluice_quota_active_keys"] == "gauge"
        assert value(samples, "sluice_quota_leases_total") == 0
        first = [_lease(orders, 4), _lease(items, 4), _lease(flat, 1)]
        second = [_lease(orders, 3, returned=2), _lease(items, 3)]
        for leases in (first, second):
            r = admin.post("/v1/quota/lease", json={"instance": "billing-1", "leases": leases})
            assert r.status_code == 200, r.text
        samples, _ = parse(anonymous.get("/metrics").text)
    assert value(samples, "sluice_quota_leases_total", rule="q/per-table") == 4
    assert value(samples, "sluice_quota_leases_total", rule="q/flat") == 1
    assert value(samples, "sluice_quota_tokens_wanted_total", rule="q/per-table") == 14
    assert value(samples, "sluice_quota_tokens_granted_total", rule="q/per-table") == 14
    assert value(samples, "sluice_quota_tokens_granted_total", rule="q/flat") == 1
    assert value(samples, "sluice_quota_tokens_returned_total", rule="q/per-table") == 2
    # Both table buckets of the keyed rule are active; keys themselves are never labels.
    assert value(samples, "sluice_quota_active_keys", rule="q/per-table") == 2
    assert value(samples, "sluice_quota_active_keys", rule="q/flat") == 1
    assert not any("table=" in v for _, labels in samples for _, v in labels)
    assert value(samples, "sluice_quota_backend_errors_total") == 0


def test_quota_backend_errors_are_counted(fresh: ControlPlane) -> None:
    cp = fresh.start("--quota", "redis://127.0.0.1:1/0")  # nothing listens there
    with cp.client() as admin, cp.client("") as anonymous:
        body = {"instance": "billing-1", "leases": [_lease("q/flat|app=billing", 1)]}
        assert admin.post("/v1/quota/lease", json=body).status_code == 503
        samples, _ = parse(anonymous.get("/metrics").text)
    assert value(samples, "sluice_quota_backend_errors_total", backend="redis") == 1
    assert value(samples, "sluice_quota_leases_total") == 0
