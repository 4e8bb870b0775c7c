"""Upstreams picked from the service catalog (sidecar/upstreams.py, sidecar/catalog.py).

The picker alone: round-robin order, least-connections, ejection (failed connects, resets)
and its expiry on a fake clock. Then the real pieces: `sluice up`'s catalog (through
py-consul), a sidecar with a `NAME.service` upstream in front of the real PostgreSQL,
instances that are dead, failed and passing again, one that resets every connection (and
one that closes them cleanly), least-connections over two live instances (the second one a
TCP relay to the same server), and the sidecar's own registrations (its app instance and
its route listeners, which `sluice dns --vip-from-catalog` answers with), gone after a
clean stop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import select
import shutil
import signal
import socket
import struct
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
from sidecar.catalog import route_entry
from sidecar.config import (
    AuditConfig,
    ControlConfig,
    Route,
    ServiceUpstream,
    SidecarConfig,
    load_config,
    parse_upstream,
)
from sidecar.upstreams import RESET_WINDOW, RESETS_TO_EJECT, Instance, Picker
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


def test_a_reset_before_any_answer_ejects_at_once() -> None:
    p = picker("round-robin", A, B)
    assert p.reset(A, 100.0, answered=False) is True
    assert p.ejected(100.0) == [A]
    assert p.pick(100.0) == B


def test_resets_of_started_sessions_eject_when_several_fall_in_the_window() -> None:
    p = picker("round-robin", A, B)
    t = 100.0
    for i in range(RESETS_TO_EJECT - 1):
        assert p.reset(A, t + i, answered=True) is False
    assert p.ejected(t + 5) == []
    # The first reset left the window (the second did not): this one does not eject yet.
    late = t + RESET_WINDOW + 0.5
    assert p.reset(A, late, answered=True) is False
    assert p.reset(A, late + 0.1, answered=True) is True  # t+1, late, late+0.1
    assert p.ejected(late + 0.1) == [A]
    # Expired and offered again: the count starts afresh.
    back = late + 0.1 + 10.0
    assert p.pick(back, frozenset({B})) == A
    assert p.reset(A, back, answered=True) is False


def test_an_instance_leaving_the_catalog_forgets_its_ejection() -> None:
    p = picker("round-robin", A, B)
    p.failed(A, 0.0)
    p.update((B,))
    p.update((A, B))
    assert p.pick(1.0) == A


def test_route_entry_names_the_listener_not_the_service() -> None:
    route = Route("orders-db", "postgres", ("0.0.0.0", 5432), ("orders-db.service", 0))
    e = route_entry("billing", "billing@h1", route, ("0.0.0.0", 5432))
    assert (e.name, e.id, e.address, e.port) == (
        "billing-sidecar",
        "billing@h1:orders-db:5432",
        "127.0.0.1",  # a wildcard listener is reached on loopback
        5432,
    )
    assert e.tags == ("sluice", "sluice-route") and e.meta["route_service"] == "orders-db"
    assert route_entry("billing", "b", route, ("::", 5432)).address == "::1"
    assert route_entry("billing", "b", route, ("127.0.0.10", 5432)).address == "127.0.0.10"


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

    def start(
        upstream: str,
        app: str = "billing",
        balance: str = "round-robin",
        eject_seconds: float | None = None,
    ) -> RunningSidecar:
        address, service = parse_upstream(upstream, balance)
        if service is not None and eject_seconds is not None:
            service = dataclasses.replace(service, eject_seconds=eject_seconds)
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


class Closer:
    """A server that accepts and closes at once: with SO_LINGER 0 (a reset) or cleanly."""

    def __init__(self, reset: bool = True) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.reset = reset
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:  # read the StartupMessage first: closing with unread input sends a reset
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_resetting_instance_ejected_and_retried_after_eject_seconds(
    catalog: consul.Consul, sidecar: Callable[..., RunningSidecar]
) -> None:
    """Connections keep succeeding: the app's opening bytes go on to the healthy instance."""
    closer = Closer(reset=True)
    try:
        name = f"orders-db-{uuid.uuid4().hex[:6]}"
        register(catalog, name, f"{name}-reset", "127.0.0.1", closer.port)
        register(catalog, name, f"{name}-live", PG_HOST, PG_PORT)
        sc = sidecar(f"{name}.service", eject_seconds=2.0)
        assert sc.sidecar is not None
        p = sc.sidecar.routes[0].picker
        assert p is not None
        wait_until(lambda: len(p.instances) == 2, "both instances listed")

        def until_reset(accepted: int) -> None:
            for _ in range(4):  # round robin: the resetting instance within two connections
                assert select_one(sc) == 1
                if closer.accepted == accepted:
                    return
            raise AssertionError("the resetting instance was not tried")

        until_reset(1)
        assert [i.id for i in p.ejected(time.monotonic())] == [f"{name}-reset"]
        assert [select_one(sc) for _ in range(3)] == [1] * 3
        assert closer.accepted == 1  # left out meanwhile
        wait_until(lambda: not p.ejected(time.monotonic()), "offered again", timeout=3)
        until_reset(2)  # tried once more, reset again, ejected again
        assert [i.id for i in p.ejected(time.monotonic())] == [f"{name}-reset"]
    finally:
        closer.close()


def test_clean_close_is_not_ejected(
    catalog: consul.Consul, sidecar: Callable[..., RunningSidecar]
) -> None:
    closer = Closer(reset=False)
    try:
        name = f"orders-db-{uuid.uuid4().hex[:6]}"
        register(catalog, name, f"{name}-fin", "127.0.0.1", closer.port)
        sc = sidecar(f"{name}.service")
        assert sc.sidecar is not None
        p = sc.sidecar.routes[0].picker
        assert p is not None
        wait_until(lambda: len(p.instances) == 1, "the instance listed")
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError) as e:
                select_one(sc)
            assert "server closed the connection" in str(e.value)
        assert closer.accepted == 2 and p.ejected(time.monotonic()) == []
    finally:
        closer.close()


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
    # Its route listener, under a service of its own: never an instance of the upstream.
    wait_until(lambda: catalog.health.service(f"{app}-sidecar", passing=True)[1], "listener")
    _, [entry] = catalog.health.service(f"{app}-sidecar", passing=True)
    svc = entry["Service"]
    assert (svc["ID"], svc["Address"], svc["Port"]) == (
        f"{app}-1:orders-db:{sc.port}",
        "127.0.0.1",
        sc.port,
    )
    assert "sluice-route" in svc["Tags"]
    assert svc["Meta"] == {
        "app": app,
        "instance": f"{app}-1",
        "route_service": "orders-db",
        "protocol": "postgres",
        "upstream": f"{app}-db.service",
    }
    assert [e["Service"]["ID"] for e in catalog.health.service(f"{app}-db")[1]] == [f"{app}-db-1"]
    sc.stop()
    wait_until(lambda: catalog.health.service(app)[1] == [], "deregistered")
    assert catalog.health.service(f"{app}-sidecar")[1] == []


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (Debian: dnsutils)")
def test_dns_vips_from_the_sidecars_registrations(
    cp: ControlPlane, catalog: consul.Consul, sidecar: Callable[..., RunningSidecar]
) -> None:
    """`sluice dns --vip-from-catalog APP` answers the route's service with its listener,
    and the service's own instances once the sidecar deregistered."""
    app = f"billing-{uuid.uuid4().hex[:6]}"
    register(catalog, "orders-db", f"{app}-orders-db", "10.9.0.1", 5432)
    catalog.agent.check.ttl_pass(f"check-{app}-orders-db")
    sc = sidecar(f"{app}-db.service", app=app)
    env = {**os.environ, "CONSUL_HTTP_TOKEN": cp.admin_token}
    dns = subprocess.Popen(
        [str(Path(sys.executable).with_name("sluice")), "dns", "--consul", cp.url,
         "--listen", "127.0.0.1:0", "--vip-from-catalog", app],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert dns.stdout is not None
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", dns.stdout.readline())
        assert m, "sluice dns did not start"
        port = m.group(1)

        def dig(qtype: str) -> list[str]:
            r = subprocess.run(
                ["dig", "@127.0.0.1", "-p", port, "+short", "+time=2", "+tries=1",
                 "orders-db.service.consul", qtype],
                capture_output=True, text=True, timeout=10, check=True,
            )  # fmt: skip
            return r.stdout.split()

        wait_until(lambda: dig("A") == ["127.0.0.1"], "the listener answered", timeout=10)
        assert dig("SRV")[:3] == ["1", "1", str(sc.port)]
        sc.stop()
        wait_until(lambda: dig("A") == ["10.9.0.1"], "the service's instance again", timeout=10)
    finally:
        dns.terminate()
        dns.communicate(timeout=10)  # and closes its stdout
        catalog.agent.service.deregister(f"{app}-orders-db")


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
