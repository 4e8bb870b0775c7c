"""`sluice up` itself: first start and later starts, --policies, state across a clean stop
and across kill -9, retention, and clear errors."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.mesh.conftest import SLUICE, ControlPlane, policy_text
from tests.mesh.test_api_audit import event, ingest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "policies"


def test_first_start_then_restart_keeps_state(fresh: ControlPlane) -> None:
    fresh.start("--policies", str(EXAMPLES))
    first = fresh.output()
    assert "policy version:  1 (2 files, 6 rules)" in first
    assert f"admin token:     {fresh.admin_token} (written to" in first
    token = fresh.admin_token
    with fresh.client() as c:
        c.post("/v1/policies", json={"files": {"a.yaml": policy_text()}}).raise_for_status()
        reader = c.post("/v1/tokens", json={"role": "reader", "name": "r"}).json()["token"]
        assert ingest(c, [event(n, "keep") for n in range(50)])["accepted"] == 50
    assert fresh.stop() == 0
    assert "sluice up: stopped" in fresh.output()

    fresh.start("--policies", str(EXAMPLES))  # differs from version 2: applied again as 3
    again = fresh.output()[len(first) :]
    assert f"in {fresh.data_dir.resolve() / 'admin.token'}" in again
    assert fresh.admin_token == token
    with fresh.client(reader) as c:
        versions = c.get("/v1/policies").json()
        assert [v["version"] for v in versions["versions"]] == [3, 2, 1]
        assert versions["versions"][0]["files"] == ["orders-db.yaml", "payments.yaml"]
        got = c.get("/v1/audit/events", params={"app": "keep-billing", "limit": 1000}).json()
        assert len(got["events"]) == 50
    assert fresh.stop() == 0
    fresh.start("--policies", str(EXAMPLES))  # same as current: no new version
    with fresh.client() as c:
        assert c.get("/v1/policies").json()["current"] == 3


def test_kill_9_loses_nothing_acknowledged(fresh: ControlPlane) -> None:
    fresh.start()
    acked: list[str] = []
    stop = threading.Event()

    def ship() -> None:
        n = 0
        with fresh.client() as c:
            while not stop.is_set():
                batch = [event(n + i, "k9") for i in range(200)]
                try:
                    r = c.post("/v1/audit/events", json={"events": batch})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked.extend(e["id"] for e in batch)
                n += 200

    t = threading.Thread(target=ship)
    t.start()
    time.sleep(1.5)
    fresh.kill()
    stop.set()
    t.join(10)
    assert len(acked) >= 200
    fresh.start()
    with fresh.client() as c:
        r = c.get("/v1/audit/export", params={"app": "k9-billing"})
        stored = {line.split('"id": "')[1].split('"')[0] for line in r.text.splitlines()}
    assert set(acked) <= stored


def test_retention_deletes_old_events_at_start(fresh: ControlPlane) -> None:
    fresh.start()
    now = time.time()
    with fresh.client() as c:
        old = [event(n, "old", time=now - 7200 - n) for n in range(5)]
        new = [event(n, "new", time=now - 60 - n) for n in range(5)]
        ingest(c, old + new)
    fresh.stop()
    fresh.start("--audit-retention", "1h")
    with fresh.client() as c:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = c.get("/v1/audit/events", params={"since": now - 86400}).json()["events"]
            if len(left) == 5:
                break
            time.sleep(0.1)
        assert sorted(e["id"] for e in left) == sorted(e["id"] for e in new)


def test_bad_policies_stop_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy_text().replace("verbs: [DROP]", "verbs: [DROPP]"))
    r = subprocess.run(
        [
            SLUICE,
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "d"),
            "--policies",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 1
    assert "--policies rejected, not starting" in r.stderr and "bad.yaml:8:21: " in r.stderr


def test_busy_port_and_bad_flags(control: ControlPlane, tmp_path: Path) -> None:
    port = control.url.rsplit(":", 1)[1]
    r = subprocess.run(
        [SLUICE, "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 1 and "cannot listen on" in r.stderr
    r = subprocess.run(
        [SLUICE, "up", "--listen", "nowhere", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2 and "expected HOST:PORT" in r.stderr
    r = subprocess.run(
        [SLUICE, "up", "--audit-retention", "forever", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2 and "--audit-retention" in r.stderr


def test_ctrl_c_ends_blocking_queries_and_streams_at_once(fresh: ControlPlane) -> None:
    fresh.start()
    done: list[float] = []

    def watch() -> None:
        with fresh.client() as c:
            with contextlib.suppress(httpx.TransportError):
                c.get("/v1/sidecar/policies", params={"index": 0, "wait": "300s"})
            done.append(time.monotonic())

    def stream() -> None:
        with fresh.client() as c:
            try:
                with c.stream("GET", "/v1/audit/stream") as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.TransportError:
                pass
            done.append(time.monotonic())

    threads = [threading.Thread(target=watch), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start = time.monotonic()
    assert fresh.stop() == 0
    for t in threads:
        t.join(10)
    assert len(done) == 2 and max(done) - start < 3.0
    assert shutil.which(SLUICE)


def test_sigterm_answers_a_held_catalog_watch_and_exits_at_once(fresh: ControlPlane) -> None:
    import consul  # the client sidecars and meshdns watch the catalog with

    fresh.start()
    host, port = fresh.url.removeprefix("http://").rsplit(":", 1)
    client = consul.Consul(
        host=host, port=int(port), token=fresh.admin_token, connections_timeout=30
    )
    index, _ = client.catalog.services()
    answers: list[tuple[str, object]] = []

    def watch() -> None:
        try:
            answers.append(("ok", client.catalog.services(index=index, wait="300s")))
        except Exception as exc:  # a 500 from a timed-out graceful shutdown lands here
            answers.append(("error", exc))

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.5)
    assert not answers  # held open
    start = time.monotonic()
    code = fresh.stop()
    elapsed = time.monotonic() - start
    thread.join(10)
    assert code == 0 and elapsed < 2.0, (code, elapsed)
    assert answers and answers[0][0] == "ok", answers  # the current state, not a 500
