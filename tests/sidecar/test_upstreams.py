"""Upstreams picked from the service catalog (sidecar/upstreams.py, sidecar/catalog.py).

The picker alone: round-robin order, least-connections, ejection and its expiry on a fake
clock. Then the real pieces: `sluice up`'s catalog (through py-consul), a sidecar with a
`NAME.service` upstream in front of the real PostgreSQL, instances that are dead, failed
and passing again, least-connections over two live instances (the second one a TCP relay
to the same server), and the sidecar's own registration, gone after a clean stop.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import psycopg
import pytest

from mesh.sidecar_cmd import _config as cli_config
from mesh.sidecar_cmd import add_parser
from sidecar.config import (
    AuditConfig,
    ControlConfig,
    Route,
    ServiceUpstream,
    SidecarConfig,
    load_config,
    parse_upstream,
)
from sidecar.upstreams import Instance, Picker
from tests.mesh.conftest import ControlPlane
from tests.sidecar.conftest import PG_HOST, PG_PORT, RunningSidecar, pg_available

A, B, C = (Instance(n, "127.0.0.1", 5000 + i) for i, n in enumerate("abc"))


def picker(balance: str = "round-robin", *instances: Instance) -> Picker:
    p = Picker(ServiceUpstream("orders-db", balance=balance, eject_seconds=10.0))
    p.update(instances or (A, B, C))
    return p


# -- the picker, pure -----------------------------------------------------------------


def test_round_robin_in_catalog_order() -> None:
    p = picker()
    assert [p.pick(0.0) for _ in range(7)] == [A, B, C, A, B, C, A]


def test_round_robin_goes_on_across_updates() -> None:
    p = picker()
    assert p.pick(0.0) == A
    p.update((A, B))  # C gone
    assert [p.pick(0.0) for _ in range(3)] == [B, A, B]
    p.update(())
    assert p.pick(0.0) is None


def test_least_connections_prefers_the_fewest_open_sessions() -> None:
    p = picker("least-connections")
    for _ in range(6):
        chosen = p.pick(0.0)
        assert chosen is not None
        p.opened(chosen)
    assert [p.open_sessions(i) for i in (A, B, C)] == [2, 2, 2]
    p.closed(B)
    p.closed(B)
    assert p.pick(0.0) == B
    p.opened(B)
    assert p.pick(0.0) == B  # still the fewest (1 against 2)
    p.closed(A)
    p.closed(A)
    p.closed(A)  # more closes than opens do not go below zero
    assert p.open_sessions(A) == 0


def test_ejection_expires_on_the_clock() -> None:
    p = picker("round-robin", A, B)
    p.failed(A, now=100.0)
    assert [p.pick(100.0), p.pick(105.0), p.pick(109.9)] == [B, B, B]
    assert p.ejected(109.9) == [A]
    assert p.pick(110.0) == A  # offered again once the ejection expired
    assert p.ejected(110.0) == []


def test_all_ejected_or_excluded_is_none() -> None:
    p = picker("round-robin", A, B)
    assert p.pick(0.0, frozenset({A, B})) is None
    p.failed(A, 0.0)
    p.failed(B, 0.0)
    assert p.pick(5.0) is None
    assert p.pick(10.0) in (A, B)


def test_an_instance_leaving_the_catalog_forgets_its_ejection() -> None:
    p = picker("round-robin", A, B)
    p.failed(A, 0.0)
    p.update((B,))
    p.update((A, B))
    assert p.pick(1.0) == A


# -- configuration ----------------------------------------------------------------------


def test_parse_upstream() -> None:
    assert parse_upstream("127.0.0.1:5432") == (("127.0.0.1", 5432), None)
    assert parse_upstream("orders-db.service") == (
        ("orders-db.service", 0),
        ServiceUpstream("orders-db"),
    )
    assert parse_upstream("primary.orders-db.service", "least-connections")[1] == (
        ServiceUpstream("orders-db", "primary", "least-connections")
    )
    with pytest.raises(ValueError, match=r"NAME\.service"):
        parse_upstream("orders-db")


def test_config_file_upstream_service(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "app: billing\npolicies: [p]\nroutes:\n"
        "  - service: orders-db\n    listen: 127.0.0.1:6432\n"
        "    upstream: {service: orders-db, tag: primary, balance: least-connections,"
        " eject_seconds: 3}\n"
        "  - service: ledger\n    listen: 127.0.0.1:6433\n    upstream: ledger-db.service\n"
    )
    routes = load_config(path).routes
    assert routes[0].upstream_service == ServiceUpstream(
        "orders-db", "primary", "least-connections", 3.0
    )
    assert routes[0].upstream_label == "orders-db.service"
    assert routes[1].upstream_service == ServiceUpstream("ledger-db")
    path.write_text(
        "app: billing\npolicies: [p]\nroutes:\n"
        "  - service: orders-db\n    listen: 127.0.0.1:6432\n"
        "    upstream: {service: orders-db, balance: random}\n"
    )
    with pytest.raises(Exception, match="balance"):
        load_config(path)


def test_cli_upstream_service() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "sidecar",
            "--app",
            "billing",
            "--service",
            "orders-db",
            "--listen",
            "127.0.0.1:6432",
            "--upstream",
            "orders-db.service",
            "--balance",
            "least-connections",
            "--policies",
            "p",
        ]
    )
    route = cli_config(args).routes[0]
    assert route.upstream_service == ServiceUpstream("orders-db", None, "least-connections")


# -- against `sluice up` and the real PostgreSQL -----------------------------------------


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    problem = pg_available()
    if problem:
        pytest.skip(problem)
    plane = ControlPlane(tmp_path_factory.mktemp("upstreams") / "data", "--no-dns")
    plane.start()
    yield plane
    assert plane.stop() == 0, plane.output()


@pytest.fixture
def catalog(cp: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> Iterator[consul.Consul]:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)  # the sidecar asks `--control`
    host, _, port = cp.url.split("//")[-1].rpartition(":")
    client = consul.Consul(host=host, port=int(port), token=cp.admin_token)
    yield client
    client.http.close()


@pytest.fixture
def sidecar(cp: ControlPlane, tmp_path: Path) -> Iterator[Callable[..., RunningSidecar]]:
    running: list[RunningSidecar] = []
    with cp.client() as admin:
        token = admin.post("/v1/tokens", json={"role": "sidecar", "name": "s"}).json()["token"]

    def start(upstream: str, app: str = "billing", balance: str = "round-robin") -> RunningSidecar:
        address, service = parse_upstream(upstream, balance)
        route = Route(
            "orders-db", "postgres", ("127.0.0.1", 0), address, 2.0, upstream_service=service
        )
        state = tmp_path / f"state-{len(running)}"
        config = SidecarConfig(
            app,
            f"{app}-{len(running) + 1}",
            (),
            (route,),
            AuditConfig(None, "all"),
            control=ControlConfig(cp.url, token, str(state)),
        )
        sc = RunningSidecar(config, tmp_path / "unused.yaml")
        running.append(sc)
        return sc

    yield start
    for sc in running:
        sc.stop()


def register(c: consul.Consul, name: str, sid: str, host: str, port: int) -> str:
    """An instance with a passing TTL check; returns the check's ID."""
    check = {"CheckID": f"check-{sid}", "TTL": "60s", "Status": "passing"}
    c.agent.service.register(name, service_id=sid, address=host, port=port, check=check)
    return f"check-{sid}"


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens here: connections are refused


def select_one(sc: RunningSidecar) -> int:
    with psycopg.connect(**sc.dsn("postgres"), connect_timeout=5) as conn:  # type: ignore[arg-type]
        row = conn.execute("SELECT 1").fetchone()
        assert row is not None
        return int(row[0])


def test_dead_instance_ejected_failed_check_and_back(
    catalog: consul.Consul, sidecar: Callable[..., RunningSidecar]
) -> None:
    name = f"orders-db-{uuid.uuid4().hex[:6]}"
    register(catalog, name, f"{name}-dead", "127.0.0.1", dead_port())
    live = register(catalog, name, f"{name}-live", PG_HOST, PG_PORT)
    sc = sidecar(f"{name}.service")
    assert sc.sidecar is not None
    p = sc.sidecar.routes[0].picker
    assert p is not None
    wait_until(lambda: len(p.instances) == 2, "both instances listed")

    assert [select_one(sc) for _ in range(6)] == [1] * 6  # the dead one costs a retry once
    assert [i.id for i in p.ejected(time.monotonic())] == [f"{name}-dead"]

    catalog.agent.check.ttl_fail(live)
    wait_until(lambda: len(p.instances) == 1, "the failed instance dropped")
    with pytest.raises(psycopg.OperationalError, match=rf"{name}\.service"):
        select_one(sc)

    catalog.agent.check.ttl_pass(live)
    wait_until(lambda: len(p.instances) == 2, "the instance back")
    assert select_one(sc) == 1


class Relay:
    """A TCP relay to PostgreSQL on a port of its own: a second instance of the server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            t = threading.Thread(target=self._pipe, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _pipe(self, a: socket.socket) -> None:
        with a, socket.create_connection((PG_HOST, PG_PORT), timeout=5) as b:
            peer = {a: b, b: a}
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.sock.close()


def test_least_connections_spreads_open_sessions(
    catalog: consul.Consul, sidecar: Callable[..., RunningSidecar]
) -> None:
    relay = Relay()
    try:
        name = f"orders-db-{uuid.uuid4().hex[:6]}"
        register(catalog, name, f"{name}-direct", PG_HOST, PG_PORT)
        register(catalog, name, f"{name}-relay", "127.0.0.1", relay.port)
        sc = sidecar(f"{name}.service", balance="least-connections")
        assert sc.sidecar is not None
        p = sc.sidecar.routes[0].picker
        assert p is not None
        wait_until(lambda: len(p.instances) == 2, "both instances listed")
        direct, relayed = sorted(p.instances, key=lambda i: i.id)
        conns = [psycopg.connect(**sc.dsn("postgres")) for _ in range(4)]  # type: ignore[arg-type]
        try:
            conns[0].close()
            conns[1].close()  # one session less on each side (they alternate)
            wait_until(lambda: p.open_sessions(direct) + p.open_sessions(relayed) == 2, "closed")
            more = [psycopg.connect(**sc.dsn("postgres")) for _ in range(2)]  # type: ignore[arg-type]
            conns += more
            assert (p.open_sessions(direct), p.open_sessions(relayed)) == (2, 2)
            assert relay.accepted == 3
            assert all(c.execute("SELECT 1").fetchone() == (1,) for c in conns if not c.closed)
        finally:
            for conn in conns:
                conn.close()
    finally:
        relay.close()


def test_sidecar_registers_its_app_and_deregisters_on_stop(
    catalog: consul.Consul, sidecar: Callable[..., RunningSidecar]
) -> None:
    app = f"billing-{uuid.uuid4().hex[:6]}"
    register(catalog, f"{app}-db", f"{app}-db-1", PG_HOST, PG_PORT)
    sc = sidecar(f"{app}-db.service", app=app)

    def passing() -> list[str]:
        _, entries = catalog.health.service(app, passing=True)
        return [e["Service"]["ID"] for e in entries]

    wait_until(lambda: passing() == [f"{app}-1"], "the app instance registered and passing")
    sc.stop()
    wait_until(lambda: catalog.health.service(app)[1] == [], "deregistered")


def test_cli_sidecar_with_a_service_upstream(
    cp: ControlPlane, catalog: consul.Consul, tmp_path: Path
) -> None:
    """`sluice sidecar --upstream NAME.service`: serves, registers, deregisters on SIGTERM."""
    name = f"orders-db-{uuid.uuid4().hex[:6]}"
    app = f"billing-{uuid.uuid4().hex[:6]}"
    register(catalog, name, f"{name}-1", PG_HOST, PG_PORT)
    with cp.client() as admin:
        token = admin.post("/v1/tokens", json={"role": "sidecar", "name": "c"}).json()["token"]
    port = dead_port()  # free: the sidecar listens there
    log = tmp_path / "sidecar.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("sluice")),
                "sidecar",
                "--app",
                app,
                "--instance",
                f"{app}-1",
                "--service",
                "orders-db",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"{name}.service",
                "--control",
                cp.url,
                "--state-dir",
                str(tmp_path / "state"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SLUICE_TOKEN": token},
        )
    try:
        dsn = {"host": "127.0.0.1", "port": port, "user": "postgres", "dbname": "postgres"}

        def serves() -> bool:
            try:
                with psycopg.connect(**dsn, connect_timeout=2) as conn:  # type: ignore[arg-type]
                    return conn.execute("SELECT 1").fetchone() == (1,)
            except psycopg.OperationalError:
                return proc.poll() is not None  # ends the wait; asserted below

        wait_until(serves, "the CLI sidecar serving", timeout=15)
        assert proc.poll() is None, log.read_text()
        wait_until(lambda: catalog.health.service(app, passing=True)[1], "registered")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    assert catalog.health.service(app)[1] == [], log.read_text()
