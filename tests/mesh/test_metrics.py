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
