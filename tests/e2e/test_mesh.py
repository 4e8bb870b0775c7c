"""The whole mesh end to end: `sluice up` and two `sluice sidecar` processes (apps billing
and reporting) in front of the real PostgreSQL, with psycopg clients driving traffic.

One scenario, in order (issue 3, "Tests and figures"):

1. traffic flows from both apps; a policy applied through the API while it flows is
   enforced by both sidecars within 1 s (apply answer -> first denial a client sees);
2. the control plane is killed with SIGKILL under load; for ~2 s the clients go on and the
   sidecars keep enforcing (a denied statement stays denied: no probe is ever allowed again);
3. the control plane restarts on the same data dir and port; once the clients stop, the
   audit trail holds exactly the statements the clients ran, allowed and denied, each once.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.sidecar.conftest import PG_HOST, PG_PORT, PG_USER
from tests.sidecar.test_control_client import ControlPlane, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SLUICE = str(Path(sys.executable).with_name("sluice"))
APPS = ("billing", "reporting")
CLIENTS_PER_APP = 2
MAX_ROUNDS = 20_000  # a bound on each client's loop; the stop event ends it long before
PAUSE = 0.004  # between rounds: steady load that leaves CPU for the processes under test

GUARD = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: items-guard}
    spec:
      destination: items-db
      default: allow
      rules:
        - {name: no-drop, sql: {verbs: [DROP]}, action: deny}
    """
)
NO_DELETE = GUARD.replace(
    "  rules:\n",
    "  rules:\n    - {name: no-delete, sql: {verbs: [DELETE], tables: [items]}, action: deny}\n",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SidecarProc:
    """`sluice sidecar --control URL --token TOKEN` for one app, on a free port."""

    def __init__(self, app: str, url: str, token: str, state_dir: Path, log: Path) -> None:
        self.app = app
        self.port = free_port()
        self.log = log
        argv = [
            SLUICE,
            "sidecar",
            "--app",
            app,
            "--instance",
            f"{app}-1",
            "--service",
            "items-db",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--upstream",
            f"{PG_HOST}:{PG_PORT}",
            "--control",
            url,
            "--token",
            token,
            "--state-dir",
            str(state_dir),
        ]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sluice sidecar exited: {self.log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Client(threading.Thread):
    """One app connection in a loop: INSERT, SELECT, and a DELETE probe that the second
    policy denies. Counts every statement it ran; remembers when it first saw a denial and
    whether a probe was ever allowed after that."""

    def __init__(self, app: str, port: int, db: str, stop: threading.Event) -> None:
        super().__init__(name=f"client-{app}", daemon=True)
        self.app, self.port, self.db, self.stop = app, port, db, stop
        self.ran = 0
        self.denied = 0
        self.first_denial: float | None = None
        self.allowed_after_denial = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def _loop(self) -> None:
        dsn = {"host": "127.0.0.1", "port": self.port, "user": PG_USER, "dbname": self.db}
        with psycopg.connect(**dsn, autocommit=True, connect_timeout=5) as c:  # type: ignore[arg-type]
            for n in range(MAX_ROUNDS):
                if self.stop.is_set():
                    return
                c.execute("INSERT INTO items (app, n) VALUES (%s, %s)", (self.app, n))
                self.ran += 1
                c.execute("SELECT count(*) FROM items WHERE app = %s", (self.app,))
                self.ran += 1
                try:
                    c.execute("DELETE FROM items WHERE n < 0")
                    if self.first_denial is not None:
                        self.allowed_after_denial += 1
                except psycopg.errors.InsufficientPrivilege:
                    if self.first_denial is None:
                        self.first_denial = time.monotonic()
                    self.denied += 1
                self.ran += 1
                time.sleep(PAUSE)


@pytest.fixture
def items_db(scratch_db: str) -> str:
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=scratch_db, autocommit=True
    ) as c:
        c.execute("CREATE TABLE IF NOT EXISTS items (app text, n int)")
    return scratch_db


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[ControlPlane, dict[str, SidecarProc]]]:
    cp = ControlPlane(tmp_path / "cp-data")
    sidecars: dict[str, SidecarProc] = {}
    try:
        cp.apply({"items.yaml": GUARD}, "e2e: guard")
        for app in APPS:
            token = cp.sidecar_token(app)
            sidecars[app] = SidecarProc(
                app, cp.url, token, tmp_path / f"{app}-state", tmp_path / f"{app}.log"
            )
        for sc in sidecars.values():
            wait_for(sc.listening, 15, f"sidecar {sc.app} listening")
        yield cp, sidecars
    finally:
        for sc in sidecars.values():
            sc.stop()
        cp.stop()


def exported(cp: ControlPlane, app: str) -> list[dict[str, object]]:
    r = cp.call("GET", "/v1/audit/export", params={"app": app})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line]


def test_mesh_end_to_end(mesh: tuple[ControlPlane, dict[str, SidecarProc]], items_db: str) -> None:
    cp, sidecars = mesh
    stop = threading.Event()
    clients = [
        Client(app, sidecars[app].port, items_db, stop)
        for app in APPS
        for _ in range(CLIENTS_PER_APP)
    ]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: all(c.ran > 30 or c.error for c in clients), 10, "traffic flowing")

        # 1. a policy change while traffic flows reaches both sidecars within 1 s
        version = cp.apply({"items.yaml": NO_DELETE}, "e2e: deny DELETE on items")
        applied = time.monotonic()
        wait_for(lambda: all(c.first_denial or c.error for c in clients), 5, "first denials")
        for c in clients:
            assert c.error is None, c.error
            assert c.first_denial is not None
            took = c.first_denial - applied
            print(f"{c.app}: first denial {took * 1000:.0f} ms after the apply answer")
            assert took < 1.0, f"{c.app}: policy took {took:.3f} s"

        # 2. kill -9 the control plane under load: enforcement goes on
        cp.kill9()
        killed = time.monotonic()
        denied_at_kill = [c.denied for c in clients]
        time.sleep(2.0)
        for c, before in zip(clients, denied_at_kill, strict=True):
            assert c.error is None, c.error
            assert c.denied > before, f"{c.app}: no statements ran while the control plane was down"
            assert c.allowed_after_denial == 0, f"{c.app}: a denied statement was allowed"

        # 3. restart on the same data dir and port; traffic goes on a little, then stops
        cp.start()
        print(f"control plane down for {time.monotonic() - killed:.2f} s")
        time.sleep(0.5)
    finally:
        stop.set()
        for c in clients:
            c.join(10)
    for c in clients:
        assert c.error is None, c.error
        assert not c.is_alive()
        assert c.allowed_after_denial == 0

    ran = {app: sum(c.ran for c in clients if c.app == app) for app in APPS}
    for app in APPS:
        wait_for(lambda app=app: len(exported(cp, app)) >= ran[app], 30, f"{app}'s events")
    time.sleep(0.5)  # anything shipped twice would have arrived by now
    for app in APPS:
        events = exported(cp, app)
        ids = [e["id"] for e in events]
        assert len(ids) == len(set(ids)) == ran[app], (app, len(ids), len(set(ids)), ran[app])
        denials = sum(e["decision"] == "deny" for e in events)
        assert denials == sum(c.denied for c in clients if c.app == app)
        assert {e["policy_version"] for e in events if e["decision"] == "deny"} == {version}
    r = cp.call("GET", "/v1/stats", params={"window": "1h", "group_by": "app"})
    assert r.status_code == 200, r.text
    counts = {g["key"]["app"]: g["count"] for g in r.json()["groups"]}
    assert counts == ran
    print(f"statements audited: {ran}")
