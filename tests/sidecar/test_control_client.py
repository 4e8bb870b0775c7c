"""The sidecar's control-plane client against the real control plane (`sluice up`) and the
real PostgreSQL: policies applied through the API are enforced within a second, audit
events arrive exactly once across a kill -9 of the control plane, and a sidecar whose
control plane is down enforces the last good set from its state dir (fail static).

Tests that need `sluice up` skip while mesh/up.py does not exist; the others (fail static
with nothing listening, the policy store, backoff, config) always run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from policies.errors import PolicyError
from sidecar.config import ControlConfig, Route, SidecarConfig, load_config
from sidecar.control import Backoff, ControlClient
from sidecar.policy_store import PolicyStore, check_set, make_set
from sidecar.spool import Spool
from tests.sidecar.conftest import PG_HOST, PG_PORT, RunningSidecar

SLUICE = str(Path(sys.executable).with_name("sluice"))
UP = [SLUICE, "up"]
BUILT = importlib.util.find_spec("mesh.up") is not None

DENY_DELETE = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: orders-guard}
    spec:
      destination: orders-db
      rules:
        - {name: no-delete, sql: {verbs: [DELETE]}, action: deny}
    """
)
DENY_UPDATE = DENY_DELETE.replace("no-delete", "no-update").replace("DELETE", "UPDATE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate` holds; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


class ControlPlane:
    """`sluice up` as its own process on a fixed port and data dir; restartable."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.start()
        self.admin = (data_dir / "admin.token").read_text().strip()

    def start(self) -> None:
        argv = [*UP, "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 20, f"sluice up on {self.url} (log: {self.log})")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sluice up exited: {self.log.read_text()}")
        token = self.data_dir / "admin.token"
        if not token.is_file():
            return False
        try:
            r = httpx.get(
                f"{self.url}/v1/status",
                headers={"Authorization": f"Bearer {token.read_text().strip()}"},
                timeout=1,
            )
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]

    def sidecar_token(self, name: str) -> str:
        r = self.call("POST", "/v1/tokens", json={"role": "sidecar", "name": name})
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

    def apply(self, files: dict[str, str], comment: str = "test") -> int:
        r = self.call("POST", "/v1/policies", json={"files": files, "comment": comment})
        assert r.status_code == 201, r.text
        version: int = r.json()["version"]
        return version

    def events(self, instance: str) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        cursor: str | None = None
        for _ in range(1000):
            params = {"instance": instance, "limit": "1000"}
            if cursor:
                params["cursor"] = cursor
            r = self.call("GET", "/v1/audit/events", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            out += body["events"]
            cursor = body["next_cursor"]
            if not cursor:
                return out
        raise AssertionError("audit pagination never ended")


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    if not BUILT:
        pytest.skip("control plane not built yet (mesh/up.py)")
    cp = ControlPlane(tmp_path / "cp-data")
    yield cp
    cp.stop()


@pytest.fixture
def sidecars() -> Iterator[Callable[..., RunningSidecar]]:
    running: list[RunningSidecar] = []

    def start(url: str, token: str, state_dir: Path, instance: str = "billing-1") -> RunningSidecar:
        route = Route("orders-db", "postgres", ("127.0.0.1", 0), (PG_HOST, PG_PORT), 3.0)
        config = SidecarConfig(
            "billing", instance, (), (route,), control=ControlConfig(url, token, str(state_dir))
        )
        sc = RunningSidecar(config, state_dir / "unused.yaml")
        running.append(sc)
        return sc

    yield start
    for sc in running:
        sc.stop()


def denied(sc: RunningSidecar, db: str, sql: str) -> bool:
    with psycopg.connect(**sc.dsn(db), autocommit=True) as c:  # type: ignore[arg-type]
        try:
            c.execute(sql)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


@pytest.fixture
def orders_table(scratch_db: str) -> str:
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user="postgres", dbname=scratch_db, autocommit=True
    ) as c:
        c.execute("CREATE TABLE IF NOT EXISTS orders (id int)")
    return scratch_db


# against the real control plane


@pytest.mark.postgres
def test_policy_applied_through_the_api_is_enforced_within_a_second(
    control_plane: ControlPlane,
    sidecars: Callable[..., RunningSidecar],
    orders_table: str,
    tmp_path: Path,
) -> None:
    cp = control_plane
    sc = sidecars(cp.url, cp.sidecar_token("billing"), tmp_path / "state")
    assert not denied(sc, orders_table, "DELETE FROM orders")
    version = cp.apply({"orders.yaml": DENY_DELETE})
    took = wait_for(lambda: denied(sc, orders_table, "DELETE FROM orders"), 1.0, "enforced")
    assert took < 1.0
    assert sc.sidecar is not None and sc.sidecar.policy_version() == version
    event = sc.events(lambda es: any(e.decision == "deny" for e in es))[-1]
    assert event.policy_version == version
    stored = tmp_path / "state" / "policies"
    assert (stored / "version").read_text().strip() == str(version)
    assert (stored / "orders.yaml").read_text() == DENY_DELETE
    r = cp.call("GET", "/v1/sidecars")
    assert [s["instance"] for s in r.json()["sidecars"]] == ["billing-1"]


@pytest.mark.postgres
def test_a_sidecar_gets_the_current_set_at_start_then_follows_changes(
    control_plane: ControlPlane,
    sidecars: Callable[..., RunningSidecar],
    orders_table: str,
    tmp_path: Path,
) -> None:
    cp = control_plane
    first = cp.apply({"orders.yaml": DENY_DELETE})
    sc = sidecars(cp.url, cp.sidecar_token("billing"), tmp_path / "state")
    assert sc.sidecar is not None and sc.sidecar.policy_version() == first
    second = cp.apply({"orders.yaml": DENY_UPDATE})
    wait_for(lambda: denied(sc, orders_table, "UPDATE orders SET id = 1"), 1.0, "second set")
    assert sc.sidecar.policy_version() == second


@pytest.mark.postgres
@pytest.mark.slow
def test_audit_arrives_exactly_once_across_a_kill_9_of_the_control_plane(
    control_plane: ControlPlane,
    sidecars: Callable[..., RunningSidecar],
    orders_table: str,
    tmp_path: Path,
) -> None:
    cp = control_plane
    cp.apply({"orders.yaml": DENY_DELETE})
    sc = sidecars(cp.url, cp.sidecar_token("billing"), tmp_path / "state")
    ran = 0
    with psycopg.connect(**sc.dsn(orders_table), autocommit=True) as c:  # type: ignore[arg-type]
        for n in range(200):
            c.execute("INSERT INTO orders VALUES (%s)", (n,))
            ran += 1
    wait_for(lambda: len(cp.events("billing-1")) == ran, 10, "first events at the server")

    cp.kill9()
    started = time.monotonic()
    with psycopg.connect(**sc.dsn(orders_table), autocommit=True) as c:  # type: ignore[arg-type]
        for n in range(300):
            c.execute("SELECT %s::int", (n,))
            ran += 1
    assert denied(sc, orders_table, "DELETE FROM orders")  # still enforced
    ran += 1
    assert time.monotonic() - started < 10  # the data path never waited on the dead server
    assert sc.sidecar is not None and sc.sidecar.spool is not None
    assert sc.sidecar.spool.pending > 0

    cp.start()
    wait_for(lambda: len(cp.events("billing-1")) >= ran, 30, "spooled events after restart")
    time.sleep(0.5)  # anything sent twice would have arrived by now
    events = cp.events("billing-1")
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)) == ran
    assert set(ids) == {e.id for e in sc.events()}
    assert sc.sidecar.spool.dropped == 0


@pytest.mark.postgres
def test_a_sidecar_started_while_the_control_plane_is_down_enforces_the_last_good_set(
    control_plane: ControlPlane,
    sidecars: Callable[..., RunningSidecar],
    orders_table: str,
    tmp_path: Path,
) -> None:
    cp = control_plane
    version = cp.apply({"orders.yaml": DENY_DELETE})
    token = cp.sidecar_token("billing")
    first = sidecars(cp.url, token, tmp_path / "state")
    assert denied(first, orders_table, "DELETE FROM orders")
    first.stop()
    cp.kill9()
    again = sidecars(cp.url, token, tmp_path / "state")
    assert again.sidecar is not None and again.sidecar.policy_version() == version
    assert denied(again, orders_table, "DELETE FROM orders")
    cp.start()  # events of the outage arrive once it is back
    wait_for(
        lambda: any(e["decision"] == "deny" for e in cp.events("billing-1")), 30, "outage events"
    )


# without a control plane: fail static, the store, backoff, config


@pytest.mark.postgres
def test_fail_static_with_nothing_listening(
    sidecars: Callable[..., RunningSidecar], orders_table: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    PolicyStore(state).save(make_set(7, {"orders.yaml": DENY_DELETE}))
    started = time.monotonic()
    sc = sidecars(f"http://127.0.0.1:{free_port()}", "sluice_x", state)
    assert time.monotonic() - started < 2  # a last good set: no wait for the control plane
    assert sc.sidecar is not None and sc.sidecar.policy_version() == 7
    assert denied(sc, orders_table, "DELETE FROM orders")
    assert not denied(sc, orders_table, "SELECT 1")
    spool = sc.sidecar.spool
    assert spool is not None
    wait_for(lambda: spool.read_batch() is not None, 2, "events spooled")
    assert sc.sidecar.control is not None and not sc.sidecar.control.reachable


def test_no_last_good_set_and_no_control_plane_starts_empty_after_a_bounded_wait(
    tmp_path: Path,
) -> None:
    route = Route("orders-db", "postgres", ("127.0.0.1", 0), (PG_HOST, PG_PORT), 3.0)
    url = f"http://127.0.0.1:{free_port()}"
    config = SidecarConfig(
        "billing", "b-1", (), (route,), control=ControlConfig(url, "t", str(tmp_path))
    )
    started = time.monotonic()
    sc = RunningSidecar(config, tmp_path / "unused.yaml")
    try:
        took = time.monotonic() - started
        assert 4 < took < 8  # INITIAL_WAIT, then version 0
        assert sc.sidecar is not None and sc.sidecar.policy_version() == 0
    finally:
        sc.stop()


def test_store_round_trip_and_atomic_swap(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    assert store.load() is None
    store.save(make_set(1, {"orders.yaml": DENY_DELETE}))
    store.save(
        make_set(
            2, {"a/orders.yaml": DENY_UPDATE, "b.yaml": DENY_DELETE.replace("orders-guard", "b")}
        )
    )
    loaded = store.load()
    assert loaded is not None
    assert loaded[0].version == 2
    assert [name for name, _ in loaded[0].files] == ["a/orders.yaml", "b.yaml"]
    assert (tmp_path / "policies").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policies", "policies.2"]


@pytest.mark.parametrize(
    "name", ["../evil.yaml", "/etc/x.yaml", ".hidden.yaml", "version", "a//b.yaml"]
)
def test_store_refuses_names_unsafe_on_disk(name: str) -> None:
    with pytest.raises(PolicyError, match="file name not usable"):
        check_set(make_set(1, {name: DENY_DELETE}))


def test_apply_ignores_a_set_it_cannot_load(tmp_path: Path) -> None:
    engines: list[int] = []
    spool = Spool(tmp_path / "spool")
    client = ControlClient(
        ControlConfig("http://127.0.0.1:1", "t", str(tmp_path)),
        app="billing",
        instance="b-1",
        spool=spool,
        routes=list,
        on_policies=lambda engine, version: engines.append(version),
    )
    assert client.apply(make_set(1, {"orders.yaml": DENY_DELETE}))
    assert not client.apply(make_set(2, {"orders.yaml": "spec: [unclosed"}))
    assert not client.apply(make_set(1, {"orders.yaml": DENY_DELETE}))  # already in force
    assert (client.version, engines) == (1, [1])
    assert PolicyStore(tmp_path).load() is not None
    body = client.registration()
    assert body["policy_version"] == 1
    assert body["audit"] == {"spooled": 0, "dropped": 0}
    spool.close()


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    low = Backoff(rand=lambda: 0.0)
    high = Backoff(rand=lambda: 1.0)
    assert [high.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [low.next() for _ in range(3)] == [0.25, 0.5, 1.0]
    high.reset()
    assert high.next() == 0.5


def test_control_section_of_a_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        textwrap.dedent(
            """\
            app: billing
            control: {url: "http://127.0.0.1:8500/", token: sluice_abc, state_dir: state}
            routes:
              - {service: orders-db, listen: "127.0.0.1:6432", upstream: "127.0.0.1:5432"}
            """
        )
    )
    config = load_config(cfg)
    assert config.policies == ()
    assert config.control == ControlConfig(
        "http://127.0.0.1:8500", "sluice_abc", str(tmp_path / "state")
    )
    assert "sluice_abc" not in repr(config)


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ("", "missing required key 'policies' (or 'control')"),
        ("control: {url: ftp://x, token: t, state_dir: s}\n", "control.url: expected an http"),
        (
            "control: {url: 'http://x:1', token: '', state_dir: s}\n",
            "control.token: must not be empty",
        ),
        ("control: {url: 'http://x:1', token: t}\n", "control: missing required key 'state_dir'"),
        (
            "control: {url: 'http://x:1', token: t, state_dir: s, spool_max_bytes: 10}\n",
            "at least 4096",
        ),
    ],
)
def test_control_section_errors(tmp_path: Path, control: str, message: str) -> None:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        "app: billing\n"
        + control
        + "routes: [{service: db, listen: '127.0.0.1:1', upstream: '127.0.0.1:2'}]\n"
    )
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_config(cfg)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--control", "http://127.0.0.1:1"], "--control needs --token"),
        (["--control", "http://127.0.0.1:1", "--token", "t"], "--control needs --state-dir"),
        (["--token", "t"], "--token and --state-dir go with --control"),
        (["--control", "127.0.0.1:1", "--token", "t", "--state-dir", "s"], "expected an http"),
        ([], "missing --policies"),
    ],
)
def test_cli_control_flags(flags: list[str], message: str) -> None:
    base = [
        "--app",
        "billing",
        "--service",
        "db",
        "--listen",
        "127.0.0.1:1",
        "--upstream",
        "127.0.0.1:2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TOKEN"}
    proc = subprocess.run(
        [SLUICE, "sidecar", *base, *flags], capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 2
    assert message in proc.stderr
