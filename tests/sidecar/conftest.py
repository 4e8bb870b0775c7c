"""Fixtures for sidecar tests: a scratch database on the real PostgreSQL, and a sidecar
running in a background thread on its own uvloop loop, in front of that server."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import uvloop

from sidecar import mysql_responses, mysql_session, pg_session
from sidecar.audit import AuditEvent, MemorySink
from sidecar.config import AuditConfig, HttpTimeouts, Route, SidecarConfig, UpstreamTls
from sidecar.server import Sidecar
from sidecar.telemetry import Telemetry
from tests.compiled import compiled_build

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"

# The policy the PostgreSQL and MySQL sidecar tests run under: a deny with a message, a deny
# of UPDATE/DELETE without WHERE, a rejecting limit and a delaying limit.
GUARD_POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: orders-db
      rules:
        - name: no-drop
          sql: {verbs: [DROP, TRUNCATE]}
          action: deny
          message: ask the DBA
        - name: bounded
          sql: {verbs: [DELETE, UPDATE], where: absent}
          action: deny
        - name: few-inserts
          sql: {verbs: [INSERT], tables: [limited]}
          action: limit
          limit: {rate: 3, per: 1s, burst: 3, scope: source-app}
          message: slow down
        - name: paced-inserts
          sql: {verbs: [INSERT], tables: [paced]}
          action: limit
          limit: {rate: 10, per: 1s, burst: 1, scope: source-app}
          on_exceed: delay
          max_delay: 2s
    """
)


def pg_available() -> str | None:
    try:
        with psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3
        ):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} ({exc})"


@pytest.fixture(scope="session")
def scratch_db() -> Iterator[str]:
    """A database of our own on the real server, dropped at the end."""
    problem = pg_available()
    if problem:
        pytest.skip(problem)
    name = f"sluice_test_{secrets.token_hex(4)}"
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True
    ) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True
    ) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RunningSidecar:
    """A `Sidecar` serving on 127.0.0.1:<ephemeral> from a thread; `stop()` ends it."""

    def __init__(
        self, config: SidecarConfig, policy_file: Path, telemetry: Telemetry | None = None
    ) -> None:
        self.sink = MemorySink()
        self.telemetry = telemetry
        self.policy_file = policy_file
        self.loop = uvloop.new_event_loop()
        self.sidecar: Sidecar | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"sidecar did not start: {self._error}")
        assert self.sidecar is not None
        self.host, self.port = self.sidecar.addresses()[0]

    def _run(self, config: SidecarConfig) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.sidecar = Sidecar(config, sink=self.sink, telemetry=self.telemetry)
            self.loop.run_until_complete(self.sidecar.start())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        if self.sidecar is not None and self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def dsn(self, dbname: str, **extra: object) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "user": PG_USER, "dbname": dbname, **extra}

    def events(
        self, predicate: Callable[[list[AuditEvent]], bool] | None = None, timeout: float = 5
    ) -> list[AuditEvent]:
        """Audit events so far; with a predicate, wait (bounded) until it holds."""
        deadline = time.monotonic() + timeout
        while True:
            events = list(self.sink.events)
            if predicate is None or predicate(events) or time.monotonic() > deadline:
                return events
            time.sleep(0.02)

    def write_policy(self, text: str) -> None:
        """Replace the policy file; the sidecar reloads it within its reload interval."""
        tmp = self.policy_file.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.policy_file)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., RunningSidecar]]:
    running: list[RunningSidecar] = []

    def start(
        policy: str,
        *,
        upstream: tuple[str, int] = (PG_HOST, PG_PORT),
        app: str = "billing",
        service: str = "orders-db",
        connect_timeout: float = 3.0,
        tls: UpstreamTls | None = None,
        record: str = "all",
        protocol: str = "postgres",
        http: HttpTimeouts | None = None,
        full_statements: bool = False,
    ) -> RunningSidecar:
        policy_file = tmp_path / f"policy-{len(running)}.yaml"
        policy_file.write_text(policy)
        route = Route(
            service,
            protocol,
            ("127.0.0.1", 0),
            upstream,
            connect_timeout,
            tls or UpstreamTls(),
            http=http or HttpTimeouts(),
        )
        audit = AuditConfig(None, record, full_statements)
        config = SidecarConfig(app, f"{app}-1", (str(policy_file),), (route,), audit, 0.05)
        sc = RunningSidecar(config, policy_file)
        running.append(sc)
        return sc

    yield start
    for sc in running:
        sc.stop()


class SidecarProcess:
    """`sluice sidecar` as its own process (the real CLI), on a free port."""

    def __init__(
        self, policy_file: Path, audit_log: Path, upstream: str = f"{PG_HOST}:{PG_PORT}"
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = "127.0.0.1"
        self.audit_log = audit_log
        argv = [
            str(Path(sys.executable).with_name("sluice")),
            "sidecar",
            "--app",
            "billing",
            "--instance",
            "billing-1",
            "--service",
            "orders-db",
            "--listen",
            f"{self.host}:{self.port}",
            "--upstream",
            upstream,
            "--policies",
            str(policy_file),
            "--audit-log",
            str(audit_log),
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sluice sidecar exited: {self.proc.stdout.read() if self.proc.stdout else ''}"
                )
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("sluice sidecar did not start listening within 15 s")

    def dsn(self, dbname: str, **extra: object) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "user": PG_USER, "dbname": dbname, **extra}

    def stop(self) -> str:
        """SIGTERM, wait, and return what it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is None or self.proc.stdout.closed:
            return ""
        with self.proc.stdout:
            return self.proc.stdout.read()


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[[str], SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(policy: str) -> SidecarProcess:
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(policy)
        sp = SidecarProcess(policy_file, tmp_path / "audit.jsonl")
        started.append(sp)
        return sp

    yield start
    for sp in started:
        sp.stop()


@pytest.fixture(params=["pure", "compiled"])
def pg_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Each build of the PostgreSQL session in turn as the test module's `PgSession`: the
    pure Python class and its Cython build (sidecar/pg_session.py, setup.py)."""
    cls: type = pg_session.PgSession
    if request.param == "compiled":
        cls = compiled_build(pg_session).PgSession
    monkeypatch.setattr(request.module, "PgSession", cls)
    return cls


@pytest.fixture(params=["pure", "compiled"])
def mysql_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Each build of the MySQL session in turn as the test module's `MySqlSession`: the pure
    Python class and the class the driver uses with the compiled response FIFO
    (sidecar/mysql_responses.py, setup.py)."""
    cls: type = mysql_session.MySqlSession
    if request.param == "compiled":
        module = compiled_build(mysql_responses)
        cls = mysql_session.over_responses(module.Responses)
    monkeypatch.setattr(request.module, "MySqlSession", cls)
    return cls
