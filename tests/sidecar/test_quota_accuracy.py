"""Mesh-wide rate limits, end to end: `sluice up` and four `sluice sidecar` processes of one
app (one process per instance, as deployed) in front of the real PostgreSQL, running
INSERTs flat out (3 psycopg threads per sidecar, 5 ms pause after a rejection) under a
200/s source-app limit.

Issue 4's test: the four sidecars run for `RUN_SECONDS` = 30 s; accepted INSERTs per
second over the run must be within 5% of the limit, and no one-second window above 1.25x.
Then one instance goes idle and the other three run for `SHORT_SECONDS`: its share must
flow to them (without that they would pass 3/4 of the limit, 150/s, far outside the 5%).
The Redis backend, two control planes sharing one Redis with the sidecars split between
them, runs `SHORT_SECONDS` too, to keep the suite near three minutes;
`python bench/quota.py --seconds 30` runs both backends longer. The limit's burst is 20 (a
tenth of the rate): a run may pass the rate by the burst, and the 1.25x criterion holds
only for a burst under a quarter of it.

Accuracy is judged only while the load exceeds the limit: a run in which fewer than 80% of
its one-second windows saw a rejection skips (the machine was too busy to keep asking),
rather than passing or failing on a load that never tested the limiter.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis

from tests.mesh.conftest import ControlPlane
from tests.sidecar.conftest import PG_HOST, PG_PORT, PG_USER

RATE = 200
RUN_SECONDS = 30.0
SHORT_SECONDS = 10.0
THREADS_PER_SIDECAR = 3  # bounded load: enough to keep each sidecar's demand above its share
# An app's retry pause after a 53400. Without one, 12 threads send ~15,000 rejected
# statements a second, each an audit event: ingesting them saturates the control plane's
# event loop (lease latency p99 0.5 s), which measures audit ingestion, not quotas. 5 ms
# still keeps the demand several times above the limit.
REJECT_PAUSE = 0.005
REDIS_URL = "redis://127.0.0.1:6379/0"
POLICY = f"""\
apiVersion: sluice/v1
kind: Policy
metadata: {{name: budget}}
spec:
  destination: orders-db
  rules:
    - name: billing-inserts
      from: [billing]
      sql: {{verbs: [INSERT]}}
      action: limit
      limit: {{rate: {RATE}, per: 1s, burst: 20, scope: source-app}}
      on_exceed: reject
"""

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _sidecar_token(cp: ControlPlane) -> str:
    with cp.client() as c:
        r = c.post("/v1/tokens", json={"role": "sidecar", "name": f"quota-{secrets.token_hex(3)}"})
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        r = c.post("/v1/policies", json={"files": {"budget.yaml": POLICY}, "comment": "quota"})
        assert r.status_code in (200, 201), r.text
        return token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SidecarProc:
    """`sluice sidecar --control ...` as its own process: one per instance, as deployed."""

    def __init__(self, tmp: Path, cp: ControlPlane, token: str, instance: str) -> None:
        self.instance = instance
        self.host, self.port = "127.0.0.1", _free_port()
        self.log = tmp / f"{instance}.log"
        argv = [
            str(Path(sys.executable).with_name("sluice")),
            "sidecar",
            *("--app", "billing", "--instance", instance, "--service", "orders-db"),
            *("--listen", f"{self.host}:{self.port}", "--upstream", f"{PG_HOST}:{PG_PORT}"),
            *("--control", cp.url, "--state-dir", str(tmp / f"state-{instance}")),
            *("--log-level", "info"),
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SLUICE_TOKEN": token},
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"sidecar exited: {self.log.read_text()}")
        text = self.log.read_text(errors="replace")
        return "policies version" in text and "listening" in text

    def dsn(self, dbname: str) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "user": PG_USER, "dbname": dbname}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Mesh:
    """Sidecars `billing-1..n`, each attached to one of the control planes in turn."""

    def __init__(self, tmp: Path, planes: list[ControlPlane], n: int) -> None:
        tokens = [_sidecar_token(cp) for cp in planes]
        self.sidecars = [
            SidecarProc(tmp, planes[i % len(planes)], tokens[i % len(planes)], f"billing-{i + 1}")
            for i in range(n)
        ]
        try:
            deadline = time.monotonic() + 20
            while not all(sc.ready() for sc in self.sidecars):
                assert time.monotonic() < deadline, "sidecars did not get their policies"
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for sc in self.sidecars:
            sc.stop()


@dataclass
class Load:
    """What a run saw: offsets (s from the start) of accepted and of rejected INSERTs, and
    the accepted count per sidecar."""

    accepted: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    per_sidecar: dict[str, int] = field(default_factory=dict)


def run_load(sidecars: list[SidecarProc], db: str, seconds: float) -> Load:
    """INSERTs flat out through `sidecars` for `seconds`."""
    load = Load(per_sidecar={sc.instance: 0 for sc in sidecars})
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = time.monotonic() + 0.5  # every connection open before the clock starts
    end = start + seconds

    def worker(sc: SidecarProc) -> None:
        mine: list[float] = []
        refused: list[float] = []
        try:
            with psycopg.connect(**sc.dsn(db), autocommit=True) as c:  # type: ignore[arg-type]
                while time.monotonic() < start:
                    time.sleep(0.005)
                while (now := time.monotonic()) < end:
                    try:
                        c.execute("INSERT INTO quota_orders VALUES (1)")
                        mine.append(now - start)
                    except psycopg.errors.ConfigurationLimitExceeded:
                        refused.append(now - start)
                        time.sleep(REJECT_PAUSE)
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
        with lock:
            load.accepted.extend(mine)
            load.rejected.extend(refused)
            load.per_sidecar[sc.instance] += len(mine)

    threads = [
        threading.Thread(target=worker, args=(sc,), daemon=True)
        for sc in sidecars
        for _ in range(THREADS_PER_SIDECAR)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    assert not errors, errors
    return load


def check(load: Load, seconds: float, what: str) -> float:
    """Assert the issue's criteria; returns accepted INSERTs per second."""
    per_second = len(load.accepted) / seconds
    windows = [0] * int(seconds)
    for t in load.accepted:
        if 0 <= t < len(windows):
            windows[int(t)] += 1
    binding = {int(t) for t in load.rejected if 0 <= t < len(windows)}
    shares = {k: round(v / seconds, 1) for k, v in load.per_sidecar.items()}
    print(f"{what}: {per_second:.1f}/s over {seconds:.0f} s; per sidecar {shares}")
    print(f"{what}: one-second windows {windows}")
    if len(binding) < 0.8 * len(windows):
        # Accuracy is only defined while demand exceeds the limit: a second in which no
        # statement was refused says the clients (starved of CPU) did not ask for more.
        pytest.skip(
            f"{what}: the load did not saturate the limit ({len(binding)} of {len(windows)} "
            f"one-second windows saw a rejection); the machine is too busy to judge accuracy"
        )
    assert abs(per_second - RATE) <= 0.05 * RATE, (what, per_second, windows)
    assert max(windows) <= 1.25 * RATE, (what, windows)
    return per_second


@pytest.fixture
def quota_table(scratch_db: str) -> str:
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user="postgres", dbname=scratch_db, autocommit=True
    ) as c:
        c.execute("CREATE TABLE IF NOT EXISTS quota_orders (id int)")
    return scratch_db


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "cp", "--no-dns")
    cp.start()
    yield cp
    cp.stop()


def test_four_sidecars_hold_a_source_app_limit_and_share_an_idle_ones_tokens(
    tmp_path: Path, quota_table: str, plane: ControlPlane
) -> None:
    mesh = Mesh(tmp_path, [plane], 4)
    try:
        check(run_load(mesh.sidecars, quota_table, RUN_SECONDS), RUN_SECONDS, "4 busy")
        # billing-4 goes idle: the other three must pass the whole limit (checked), not
        # the 3/4 of it their shares were while it asked too.
        load = run_load(mesh.sidecars[:3], quota_table, SHORT_SECONDS)
        check(load, SHORT_SECONDS, "3 busy, 1 idle")
    finally:
        mesh.stop()


def _redis_problem() -> str | None:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis is not reachable on {REDIS_URL} ({exc})"
    finally:
        client.close()
    return None


def test_two_control_planes_sharing_redis_hold_the_limit(tmp_path: Path, quota_table: str) -> None:
    problem = _redis_problem()
    if problem:
        pytest.skip(problem)
    prefix = f"sluice-test-{secrets.token_hex(4)}:"
    args = ("--no-dns", "--quota", REDIS_URL, "--quota-prefix", prefix)
    planes = [ControlPlane(tmp_path / f"cp{i}", *args).start() for i in range(2)]
    r = redis.Redis.from_url(REDIS_URL)
    try:
        mesh = Mesh(tmp_path, planes, 4)
        try:
            load = run_load(mesh.sidecars, quota_table, SHORT_SECONDS)
            check(load, SHORT_SECONDS, "redis, 2 cps")
        finally:
            mesh.stop()
        assert r.keys(prefix + "*"), "the buckets should live in Redis"
    finally:
        for cp in planes:
            cp.stop()
        keys = list(r.scan_iter(prefix + "*"))
        if keys:
            r.delete(*keys)
        r.close()
