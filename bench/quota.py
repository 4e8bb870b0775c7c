"""Mesh-wide rate limits: hot-path cost and accuracy of leased quotas.

python bench/quota.py [--seconds S] [--sidecars 1,4,16] [--backends memory,redis]

1. hot path, in-process, µs per statement:
   - `take()` alone: no limit (the session skips the limiter), a local bucket (`Limiter`,
     source-instance scope), a leased mesh-wide key (`QuotaLimiter` holding tokens: what
     every statement under a source-app limit costs) and a leased key of a limit keyed by
     table (`limit.key: table`: the same plus `KeyCap`'s bookkeeping).
   - the statement's whole policy path, `SqlDecider.decide` (cached) plus `take()`: an
     INSERT no limit matches against one under a source-app limit, and under a keyed one.
2. accuracy: `sluice up` (a subprocess; `--quota redis://...` for the Redis backend, two
   control planes sharing it with the sidecars split between them) and N `QuotaLimiter`s -
   the sidecar's own leasing code - in this process, each with its own HTTP client, asking
   flat out (a statement every 0.5 ms each) under a 200/s source-app limit with burst 20.
   Granted statements per second over the run, and the highest one-second window. The
   end-to-end run through real sidecars and PostgreSQL is tests/sidecar/test_quota_accuracy.py.

Not a CI test. Targets (exit 1 when missed): leased take within 2 µs of the local bucket's
p50, and a limited statement's policy path within `PATH_BUDGET_US` of an unlimited one's;
every accuracy run within 5% of the limit and no window above 1.25x.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import check, percentile, table, time_each
from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine, LimitTicket
from policies.loader import load_texts
from policies.spec import KeyAttribute, Limit, LimitKey, OnExceed, Scope
from policies.sql.inspect import SessionState
from sidecar.limits import Limiter
from sidecar.quota import QuotaLimiter

SLUICE = str(Path(sys.executable).with_name("sluice"))
RATE, BURST = 200, 20
REDIS_URL = "redis://127.0.0.1:6379/0"
ASK_EVERY = 0.0005  # each simulated sidecar asks for a token this often: 2,000/s
# What a limit may add to a statement's policy path: 1% of a ~0.5 ms round trip to a local
# PostgreSQL through the sidecar.
PATH_BUDGET_US = 5.0


def ticket(scope: Scope, key: str) -> LimitTicket:
    return LimitTicket("bench/r", key, Limit(RATE, 1.0, BURST, scope, OnExceed.REJECT, 0.0), None)


STATEMENT_POLICY = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: bench}
spec:
  destination: orders-db
  rules:
    - {name: no-drop, sql: {verbs: [DROP]}, action: deny}
    - name: budget
      sql: {verbs: [INSERT], tables: [orders]}
      action: limit
      limit: {rate: 200, per: 1s, scope: source-app}
    - name: per-table
      sql: {verbs: [INSERT], tables: [items]}
      action: limit
      limit: {rate: 200, per: 1s, scope: source-app, key: table}
"""


def _no_client() -> httpx.AsyncClient:
    raise AssertionError("the hot path sends nothing")


def _stocked(q: QuotaLimiter, tickets: tuple[LimitTicket, ...]) -> None:
    """Leases holding more tokens than the bench takes, as if granted a moment ago."""
    q.take(tickets, 0.0)
    q.apply([{"key": t.key, "tokens": 1e12, "expires_in": 1e9} for t in tickets], 0.0)


def hot_path() -> bool:
    local_t = ticket(Scope.SOURCE_INSTANCE, "bench/r|instance=billing/1")
    leased_t = ticket(Scope.SOURCE_APP, "bench/r|app=billing")
    keyed_limit = replace(leased_t.limit, key=LimitKey(KeyAttribute.TABLE))
    keyed_t = LimitTicket(
        "bench/k", "bench/k|app=billing|table=items", keyed_limit, None, "items",
        "bench/k|app=billing|table~other",
    )  # fmt: skip
    local = Limiter()
    local.buckets.get(local_t.key, local_t.limit, 0.0).capacity = 1e12
    local.buckets.get(local_t.key, local_t.limit, 0.0).tokens = 1e12
    leased = QuotaLimiter("billing-1", _no_client)
    _stocked(leased, (leased_t, keyed_t))
    n = 200_000
    rows = []
    results = {}
    for name, fn in (
        ("no limit", lambda i: local.take((), i * 1e-6)),
        ("local bucket", lambda i: local.take((local_t,), i * 1e-6)),
        ("leased (mesh-wide)", lambda i: leased.take((leased_t,), i * 1e-6)),
        ("leased, keyed by table", lambda i: leased.take((keyed_t,), i * 1e-6)),
    ):
        samples = time_each(fn, n)
        results[name] = percentile(samples, 0.5)
        rows.append((name, percentile(samples, 0.5), percentile(samples, 0.99)))
    print(table(("take() of one statement", "p50 µs", "p99 µs"), rows))
    ok = check(
        "leased take vs local bucket",
        results["leased (mesh-wide)"] <= results["local bucket"] + 2.0,
        f"{results['leased (mesh-wide)']:.2f} µs vs {results['local bucket']:.2f} µs",
    )
    return statement_path(n) and ok


def statement_path(n: int) -> bool:
    """decide (cached, as for every repeated statement) + take, per statement."""
    engine = Engine(load_texts([("bench.yaml", STATEMENT_POLICY)]))
    peer = Peer("billing", "orders-db", "billing-1")
    decider = SqlDecider(engine, peer, SessionState("postgres"))
    q = QuotaLimiter("billing-1", _no_client)
    statements = {
        "INSERT, no limit": "INSERT INTO customers (id) VALUES (1)",
        "INSERT, source-app limit (leased)": "INSERT INTO orders (id) VALUES (1)",
        "INSERT, limit keyed by table": "INSERT INTO items (id) VALUES (1)",
    }
    for sql in statements.values():
        _, decision = decider.decide(sql, 0.0)
        if decision.limits:
            _stocked(q, decision.limits)

    def path(sql: str) -> Callable[[int], object]:
        def one(i: int) -> object:
            now = i * 1e-6
            _, decision = decider.decide(sql, now)
            return q.take(decision.limits, now) if decision.limits else None

        return one

    rows = []
    p50 = {}
    for name, sql in statements.items():
        samples = time_each(path(sql), n)
        p50[name] = percentile(samples, 0.5)
        rows.append((name, percentile(samples, 0.5), percentile(samples, 0.99)))
    print(table(("decide + take, one statement", "p50 µs", "p99 µs"), rows))
    base = p50["INSERT, no limit"]
    worst = max(v for k, v in p50.items() if k != "INSERT, no limit")
    return check(
        "limited vs unlimited statement",
        worst <= base + PATH_BUDGET_US,
        f"+{worst - base:.2f} µs at most ({base:.2f} µs unlimited)",
    )


class Plane:
    """`sluice up` on a free port, with an admin token to lease with."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.data = tmp / f"cp-{secrets.token_hex(3)}"
        self.log = open(self.data.with_suffix(".log"), "wb")  # noqa: SIM115
        argv = [SLUICE, "up", "--listen", "127.0.0.1:0", "--no-dns", "--data-dir", str(self.data)]
        self.proc = subprocess.Popen([*argv, *extra], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            m = re.search(r"control API on (http://\S+)", self.data.with_suffix(".log").read_text())
            if m:
                self.url = m.group(1)
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(self.data.with_suffix(".log").read_text())
            time.sleep(0.05)
        self.token = (self.data / "admin.token").read_text().strip()
        for _ in range(100):
            try:
                httpx.get(self.url + "/v1/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def _const(client: httpx.AsyncClient) -> Callable[[], httpx.AsyncClient]:
    return lambda: client


async def simulate(planes: list[Plane], sidecars: int, seconds: float) -> list[int]:
    """N QuotaLimiters asking flat out; granted statements per one-second window."""
    t = ticket(Scope.SOURCE_APP, f"bench/r|app=billing-{secrets.token_hex(3)}")
    clients = [
        httpx.AsyncClient(
            base_url=planes[i % len(planes)].url,
            headers={"Authorization": f"Bearer {planes[i % len(planes)].token}"},
        )
        for i in range(sidecars)
    ]
    limiters = [QuotaLimiter(f"billing-{i}", _const(c)) for i, c in enumerate(clients)]
    tasks = [asyncio.create_task(q.run()) for q in limiters]
    windows = [0] * int(seconds)
    start = time.time()

    async def demand(q: QuotaLimiter) -> None:
        while (now := time.time()) < start + seconds:
            if q.take((t,), now).granted:
                windows[min(len(windows) - 1, int(now - start))] += 1
            await asyncio.sleep(ASK_EVERY)

    await asyncio.gather(*(demand(q) for q in limiters))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in clients:
        await c.aclose()
    return windows


def accuracy(seconds: float, counts: list[int], backends: list[str]) -> bool:
    ok = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            prefix = f"sluice-bench-{secrets.token_hex(4)}:"
            if backend == "redis":
                try:
                    import redis

                    with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1) as probe:
                        probe.ping()
                except Exception as exc:
                    print(f"redis backend skipped: {REDIS_URL} unreachable ({exc})")
                    continue
                extra = ("--quota", REDIS_URL, "--quota-prefix", prefix)
                planes = [Plane(Path(tmp), *extra) for _ in range(2)]
            else:
                planes = [Plane(Path(tmp))]
            try:
                for n in counts:
                    windows = asyncio.run(simulate(planes, n, seconds))
                    rate = sum(windows) / seconds
                    good = abs(rate - RATE) <= 0.05 * RATE and max(windows) <= 1.25 * RATE
                    ok &= good
                    label = f"{backend} ({len(planes)} cp)"
                    rows.append(
                        (label, n, rate, max(windows), min(windows), "ok" if good else "MISS")
                    )
            finally:
                for p in planes:
                    p.stop()
                if backend == "redis":
                    r = redis.Redis.from_url(REDIS_URL)
                    keys = list(r.scan_iter(prefix + "*"))
                    if keys:
                        r.delete(*keys)
                    r.close()
    print(
        table(
            (
                f"backend, {RATE}/s limit, {seconds:.0f} s",
                "sidecars",
                "granted/s",
                "max 1 s",
                "min 1 s",
                "",
            ),
            rows,
        )
    )
    return check(
        "accuracy", ok, "within 5% of the limit, no window above 1.25x" if ok else "missed"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sidecars", default="1,4,16")
    ap.add_argument("--backends", default="memory,redis")
    args = ap.parse_args()
    ok = hot_path()
    counts = [int(x) for x in args.sidecars.split(",")]
    ok &= accuracy(args.seconds, counts, args.backends.split(","))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
