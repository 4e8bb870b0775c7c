"""Tokens and roles against the real server: 401 without or with an unknown token, 403 for a
role that may not, JSON errors everywhere, tokens created, listed and deleted."""

from __future__ import annotations

import os
import stat

import httpx
import pytest

from tests.mesh.conftest import ControlPlane

# (method, path, body) -> roles allowed (docs/api.md)
CALLS = [
    ("GET", "/v1/status", None, {"admin", "reader", "sidecar"}),
    ("GET", "/v1/policies", None, {"admin", "reader"}),
    ("GET", "/v1/policies/current", None, {"admin", "reader"}),
    ("POST", "/v1/policies", {"files": {}}, {"admin"}),
    ("GET", "/v1/sidecar/policies", None, {"admin", "sidecar"}),
    ("PUT", "/v1/sidecars/auth-test", {"app": "a"}, {"admin", "sidecar"}),
    ("GET", "/v1/sidecars", None, {"admin", "reader"}),
    ("POST", "/v1/audit/events", {"events": []}, {"admin", "sidecar"}),
    ("GET", "/v1/audit/events", None, {"admin", "reader"}),
    ("GET", "/v1/audit/export", None, {"admin", "reader"}),
    ("GET", "/v1/stats", None, {"admin", "reader"}),
    ("GET", "/v1/tokens", None, {"admin"}),
    ("POST", "/v1/tokens", {"role": "reader", "name": "x"}, {"admin"}),
]


@pytest.fixture(scope="module")
def tokens(control: ControlPlane) -> dict[str, str]:
    out = {"admin": control.admin_token}
    with control.client() as c:
        for role in ("reader", "sidecar"):
            r = c.post("/v1/tokens", json={"role": role, "name": f"auth-{role}"})
            assert r.status_code == 201, r.text
            out[role] = r.json()["token"]
    return out


def test_admin_token_file_is_private(control: ControlPlane) -> None:
    path = control.data_dir / "admin.token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert control.admin_token.startswith("sluice_")
    assert control.admin_token in control.output()


@pytest.mark.parametrize(("method", "path", "body", "roles"), CALLS, ids=lambda x: str(x))
def test_roles(
    control: ControlPlane,
    tokens: dict[str, str],
    method: str,
    path: str,
    body: object,
    roles: set[str],
) -> None:
    with httpx.Client(base_url=control.url, timeout=10) as c:
        r = c.request(method, path, json=body)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert "Bearer" in r.headers["www-authenticate"]
        r = c.request(method, path, json=body, headers={"Authorization": "Bearer sluice_nope"})
        assert r.status_code == 401 and r.json()["detail"] == "unknown token"
        r = c.request(method, path, json=body, headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401
        for role, token in tokens.items():
            r = c.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
            if role in roles:
                assert r.status_code < 400, (role, r.text)
            else:
                assert r.status_code == 403, (role, r.text)
                assert set(r.json()) == {"error", "detail"} and role in r.json()["detail"]


def test_token_lifecycle(control: ControlPlane, admin: httpx.Client) -> None:
    r = admin.post("/v1/tokens", json={"role": "reader", "name": "temp"})
    assert r.status_code == 201
    made = r.json()
    assert set(made) == {"id", "name", "role", "token", "created"}
    assert made["token"].startswith("sluice_") and len(made["token"]) == 7 + 43
    listed = admin.get("/v1/tokens").json()["tokens"]
    assert {
        "id": made["id"],
        "name": "temp",
        "role": "reader",
        "created": made["created"],
    } in listed
    assert all("token" not in t and "hash" not in t for t in listed)
    with control.client(made["token"]) as reader:
        assert reader.get("/v1/status").status_code == 200
        assert admin.delete(f"/v1/tokens/{made['id']}").json() == {"deleted": made["id"]}
        assert reader.get("/v1/status").status_code == 401
    assert admin.delete(f"/v1/tokens/{made['id']}").status_code == 404


def test_token_errors(admin: httpx.Client) -> None:
    r = admin.post("/v1/tokens", json={"role": "root", "name": "x"})
    assert r.status_code == 422 and "role" in r.json()["detail"]
    r = admin.post("/v1/tokens", json={"role": "reader"})
    assert r.status_code == 422 and "name" in r.json()["detail"]
    r = admin.post("/v1/tokens", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed request"


def test_the_last_admin_token_cannot_be_deleted(admin: httpx.Client) -> None:
    admins = [t for t in admin.get("/v1/tokens").json()["tokens"] if t["role"] == "admin"]
    assert len(admins) == 1
    r = admin.delete(f"/v1/tokens/{admins[0]['id']}")
    assert r.status_code == 409 and "only admin token" in r.json()["detail"]


def test_unknown_route_and_method_are_json(admin: httpx.Client) -> None:
    r = admin.get("/v1/nope")
    assert r.status_code == 404 and set(r.json()) == {"error", "detail"}
    r = admin.delete("/v1/policies")
    assert r.status_code == 405 and r.json()["error"] == "method not allowed"


def test_openapi_document(control: ControlPlane) -> None:
    doc = httpx.get(control.url + "/v1/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/v1/status",
        "/v1/policies",
        "/v1/policies/current",
        "/v1/policies/{version}",
        "/v1/policies/{a}/diff/{b}",
        "/v1/policies/rollback",
        "/v1/sidecar/policies",
        "/v1/sidecars/{instance}",
        "/v1/sidecars",
        "/v1/audit/events",
        "/v1/audit/stream",
        "/v1/audit/export",
        "/v1/stats",
        "/v1/tokens",
        "/v1/tokens/{token_id}",
    } <= paths


def test_status(control: ControlPlane, admin: httpx.Client) -> None:
    s = admin.get("/v1/status").json()
    assert s["data_dir"] == str(control.data_dir.resolve())
    assert isinstance(s["policy_version"], int) and isinstance(s["sidecars"], int)
    assert s["version"] and s["started"] > 0
