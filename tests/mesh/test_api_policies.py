"""Policy versions through the API: apply, list, show, diff, rollback, validation (422 with
file:line problems, nothing changed) and the sidecars' blocking query."""

from __future__ import annotations

import threading
import time

import httpx

from tests.mesh.conftest import ControlPlane, policy_text

BAD = (
    "apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  destination: db\n"
    "  rules:\n    - name: r\n      sql: {verbs: [DELETE], tabels: [t]}\n      action: deny\n"
)


def apply(c: httpx.Client, files: dict[str, str], comment: str = "") -> dict[str, object]:
    r = c.post("/v1/policies", json={"files": files, "comment": comment})
    assert r.status_code == 201, r.text
    out: dict[str, object] = r.json()
    return out


def test_apply_list_show_diff_rollback(admin: httpx.Client) -> None:
    v1 = apply(admin, {"guard.yaml": policy_text("g1")}, "first")
    assert v1["files"] == ["guard.yaml"] and v1["policies"] == 1 and v1["rules"] == 1
    assert v1["comment"] == "first" and v1["author"] == "admin"
    n = int(v1["version"])  # type: ignore[call-overload]
    v2 = apply(admin, {"guard.yaml": policy_text("g2"), "sub/more.yaml": policy_text("g3")})
    assert v2["version"] == n + 1 and v2["policies"] == 2

    listed = admin.get("/v1/policies").json()
    assert listed["current"] == n + 1
    assert [v["version"] for v in listed["versions"]][:2] == [n + 1, n]
    assert listed["versions"][0]["files"] == ["guard.yaml", "sub/more.yaml"]

    cur = admin.get("/v1/policies/current").json()
    assert cur["version"] == n + 1
    assert cur["files"] == {"guard.yaml": policy_text("g2"), "sub/more.yaml": policy_text("g3")}
    old = admin.get(f"/v1/policies/{n}").json()
    assert old["files"] == {"guard.yaml": policy_text("g1")} and old["comment"] == "first"

    d = admin.get(f"/v1/policies/{n}/diff/{n + 1}").json()
    assert d["from"] == n and d["to"] == n + 1
    assert "--- a/guard.yaml\n+++ b/guard.yaml\n" in d["diff"]
    assert "-metadata: {name: g1}\n+metadata: {name: g2}\n" in d["diff"]
    assert "--- /dev/null\n+++ b/sub/more.yaml\n" in d["diff"]
    assert admin.get(f"/v1/policies/{n}/diff/{n}").json()["diff"] == ""

    r = admin.post("/v1/policies/rollback", json={"version": n})
    assert r.status_code == 201, r.text
    back = r.json()
    assert back["version"] == n + 2 and back["comment"] == f"rollback to version {n}"
    assert admin.get("/v1/policies/current").json()["files"] == {"guard.yaml": policy_text("g1")}


def test_invalid_set_is_rejected_whole(admin: httpx.Client) -> None:
    before = admin.get("/v1/policies").json()
    r = admin.post(
        "/v1/policies", json={"files": {"good.yaml": policy_text("ok"), "bad.yaml": BAD}}
    )
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "invalid policies" and "nothing accepted" in body["detail"]
    assert body["problems"] == [
        {
            "file": "bad.yaml",
            "line": 8,
            "column": 30,
            "message": "rule 'r': sql: unknown key 'tabels'; expected one of tables, verbs, where",
        }
    ]
    assert admin.get("/v1/policies").json() == before


def test_bad_names_and_bodies(admin: httpx.Client) -> None:
    before = admin.get("/v1/policies").json()["current"]
    for name in ("../x.yaml", "/etc/x.yaml", "x.txt", ".hidden.yaml", "a//b.yaml"):
        r = admin.post("/v1/policies", json={"files": {name: policy_text()}})
        assert r.status_code == 422, name
        assert "file name" in r.json()["detail"]
    assert admin.post("/v1/policies", json={"files": "x"}).status_code == 422
    assert admin.post("/v1/policies", json=[]).status_code == 422
    r = admin.post("/v1/policies", content=b"files=x")
    assert r.status_code == 400 and "application/json" in r.json()["detail"]
    assert admin.get("/v1/policies").json()["current"] == before


def test_unknown_versions(admin: httpx.Client) -> None:
    assert admin.get("/v1/policies/999999").status_code == 404
    assert admin.get("/v1/policies/1/diff/999999").status_code == 404
    assert admin.post("/v1/policies/rollback", json={"version": 999999}).status_code == 404
    assert admin.get("/v1/policies/-1").status_code == 422
    assert admin.get("/v1/policies/abc").status_code == 422
    assert admin.get("/v1/policies/99999999999999999999999").status_code == 422


def test_blocking_query_returns_within_a_second_of_an_apply(admin: httpx.Client) -> None:
    index = admin.get("/v1/sidecar/policies").json()["version"]
    answers: list[tuple[float, httpx.Response]] = []

    def watch() -> None:
        r = admin.get("/v1/sidecar/policies", params={"index": index, "wait": "20s"})
        answers.append((time.monotonic(), r))

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.5)
    assert not answers, "the blocking query returned before any change"
    applied = time.monotonic()
    new = apply(admin, {"watched.yaml": policy_text("watched")})
    t.join(10)
    done, r = answers[0]
    assert done - applied < 1.0
    assert r.json()["version"] == new["version"] == index + 1
    assert r.headers["X-Sluice-Index"] == str(index + 1)
    assert r.json()["files"] == {"watched.yaml": policy_text("watched")}


def test_blocking_query_times_out(admin: httpx.Client) -> None:
    index = admin.get("/v1/sidecar/policies").json()["version"]
    start = time.monotonic()
    r = admin.get("/v1/sidecar/policies", params={"index": index, "wait": "700ms"})
    took = time.monotonic() - start
    assert 0.6 < took < 2.0
    assert r.status_code == 200 and r.json()["version"] == index
    assert r.headers["X-Sluice-Index"] == str(index)


def test_blocking_query_answers_at_once_for_another_index(admin: httpx.Client) -> None:
    index = admin.get("/v1/sidecar/policies").json()["version"]
    for other in (index - 1, index + 5):
        start = time.monotonic()
        r = admin.get("/v1/sidecar/policies", params={"index": other, "wait": "10s"})
        assert time.monotonic() - start < 1.0 and r.json()["version"] == index
    for wait in ("abc", "-1s", "5x"):
        r = admin.get("/v1/sidecar/policies", params={"index": index, "wait": wait})
        assert r.status_code == 422 and "wait" in r.json()["detail"]


def test_version_zero_before_any_apply(fresh: ControlPlane) -> None:
    fresh.start()
    with fresh.client() as c:
        r = c.get("/v1/sidecar/policies", params={"index": 0, "wait": "1ms"})
        assert r.json() == {"version": 0, "files": {}}
        assert r.headers["X-Sluice-Index"] == "0"
        assert c.get("/v1/policies").json() == {"current": 0, "versions": []}
        assert c.get("/v1/policies/current").json()["files"] == {}
