"""Control-plane figures: audit ingest rate through the API, query latency over a large
audit store, and policy propagation to 20 sidecars.

python bench/control_plane.py [--ingest-events N] [--store-events N] [--store-budget S]
                              [--sidecars N] [--applies N]

1. ingest: `sluice up` (a subprocess), batches of 500 events POSTed to /v1/audit/events
   one after another, as a sidecar's shipper sends them; events/s into SQLite (each batch
   committed with synchronous=FULL before its answer).
2. queries: 1 million events written straight through the store module (mesh/store/audit.py,
   batches of 5,000; stops at the time budget and says how many), then p50/p99 of the API's
   queries over them, called on the store as the API's worker threads do.
3. propagation: 20 `ControlClient`s (the sidecar's own client code, sidecar/control.py) in
   one process hold blocking queries on the `sluice up` of step 1; ~10 policy sets are
   applied through the API; for each, the time from sending the apply to each client having
   validated and swapped in the new set. The clients share one event loop and one CPU, so
   the 20th waits for 19 validations before it: p99 includes that queueing.

Not a CI test. Targets (exit 1 when missed): ingest >= 2,000 events/s; newest-100 query
p99 < 50 ms over the store; propagation p99 < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import check, percentile, table, terminate
from mesh.store import Stores
from mesh.store.audit import AuditFilter
from policies.engine import Engine
from sidecar.config import ControlConfig
from sidecar.control import ControlClient
from sidecar.spool import Spool

SLUICE = str(Path(sys.executable).with_name("sluice"))
BATCH = 500
STORE_BATCH = 5000
APPS = ("billing", "reporting", "search", "checkout")
VERBS = ("SELECT", "INSERT", "UPDATE", "DELETE")
TABLES = ("orders", "order_items", "customers", "invoices", "payments")
POLICY = (
    "apiVersion: sluice/v1\nkind: Policy\nmetadata: {{name: bench}}\nspec:\n"
    "  destination: orders-db\n  rules:\n    - name: rule-{n}\n"
    "      sql: {{verbs: [DROP]}}\n      action: deny\n"
)


def make_event(n: int, t: float, tag: str) -> dict[str, Any]:
    verb = VERBS[n % 4]
    decision = "deny" if n % 50 == 0 else "allow"
    table_name = TABLES[n % 5]
    return {
        "id": f"{tag}-{n}",
        "time": t,
        "app": APPS[n % 4],
        "instance": f"{APPS[n % 4]}-{n % 3}",
        "service": "orders-db",
        "session": f"s-{n % 100}",
        "protocol": "postgres",
        "decision": decision,
        "action": decision,
        "enforced": True,
        "rules": ["orders-db-guard/no-unbounded-writes"] if decision == "deny" else [],
        "rule": "orders-db-guard/no-unbounded-writes" if decision == "deny" else None,
        "verbs": [verb],
        "tables": [table_name],
        "statement": f"{verb} ... {table_name} WHERE id = $1 /* {n % 1000} */",
        "duration_ms": 0.4,
        "rows": 1,
        "error": "42501" if decision == "deny" else None,
        "policy_version": 3,
    }


class Up:
    """`sluice up` on a free port over a temporary data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.log = data_dir.parent / "up.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [SLUICE, "up", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        self.url = ""
        while time.monotonic() < deadline and not self.url:
            m = re.search(r"control API on (http://\S+)", self.log.read_text())
            if m:
                self.url = m.group(1)
            elif self.proc.poll() is not None:
                raise SystemExit(f"sluice up exited:\n{self.log.read_text()}")
            time.sleep(0.05)
        if not self.url:
            raise SystemExit("sluice up did not start within 20 s")
        self.admin = (data_dir / "admin.token").read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.admin}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        terminate(self.proc, grace=10)


def bench_ingest(up: Up, total: int) -> float:
    with up.client() as admin:
        token = admin.post("/v1/tokens", json={"role": "sidecar", "name": "bench"}).json()["token"]
    tag = uuid.uuid4().hex[:8]
    now = time.time()
    bodies = [
        {"events": [make_event(b * BATCH + i, now, tag) for i in range(BATCH)]}
        for b in range(total // BATCH)
    ]
    with up.client(token) as c:
        start = time.perf_counter()
        for body in bodies:
            r = c.post("/v1/audit/events", json=body)
            assert r.status_code == 200 and r.json()["accepted"] == BATCH, r.text
        took = time.perf_counter() - start
    return len(bodies) * BATCH / took


def fill_store(data_dir: Path, target: int, budget: float) -> tuple[Stores, int, float]:
    stores = Stores.open(data_dir)
    tag = uuid.uuid4().hex[:8]
    start = time.monotonic()
    t0 = time.time() - 3600  # an hour of traffic, oldest first
    n = 0
    while n < target and time.monotonic() - start < budget:
        batch = [make_event(n + i, t0 + (n + i) * 3600 / target, tag) for i in range(STORE_BATCH)]
        stores.audit.ingest(batch)
        n += STORE_BATCH
    return stores, n, time.monotonic() - start


def bench_queries(stores: Stores, reps: int) -> list[tuple[str, float, float]]:
    audit = stores.audit
    first, cursor = audit.query(AuditFilter(), 100)
    # Windows end at the newest event: the fill may stop before the hour it spreads over.
    end = first[0]["time"] + 0.001
    cases: list[tuple[str, Any]] = [
        ("newest 100", lambda: audit.query(AuditFilter(), 100)),
        ("next page (cursor)", lambda: audit.query(AuditFilter(), 100, cursor)),
        ("app=billing", lambda: audit.query(AuditFilter(app="billing"), 100)),
        ("decision=deny", lambda: audit.query(AuditFilter(decision="deny"), 100)),
        (
            "verb=DELETE table=orders",
            lambda: audit.query(AuditFilter(verb="DELETE", table="orders"), 100),
        ),
        ("last 5 min", lambda: audit.query(AuditFilter(since=end - 300), 100)),
        ("q substring (rare)", lambda: audit.query(AuditFilter(q="/* 999 */"), 100)),
        ("stats 5m by app,verb", lambda: audit.stats(300, ["app", "verb"], AuditFilter(until=end))),
        ("stats 1h by decision", lambda: audit.stats(3600, ["decision"], AuditFilter(until=end))),
    ]
    out = []
    for name, fn in cases:
        samples = []
        deadline = time.monotonic() + 15
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1000)
            if time.monotonic() > deadline:
                break
        out.append((name, percentile(samples, 0.5), percentile(samples, 0.99)))
    return out


async def bench_propagation(up: Up, state: Path, sidecars: int, applies: int) -> list[float]:
    with up.client() as admin:
        token = admin.post("/v1/tokens", json={"role": "sidecar", "name": "bench-watch"}).json()[
            "token"
        ]
    seen: dict[int, list[float]] = {}
    clients = []
    for i in range(sidecars):

        def saw(_engine: Engine, version: int) -> None:
            seen.setdefault(version, []).append(time.perf_counter())

        d = state / f"sidecar-{i}"
        config = ControlConfig(up.url, token, str(d))
        clients.append(
            ControlClient(
                config,
                app="billing",
                instance=f"billing-{i}",
                spool=Spool(str(d / "spool")),
                routes=list,
                on_policies=saw,
            )
        )
    for c in clients:
        await c.start()
    await asyncio.sleep(0.5)  # every client now holds a blocking query
    delays: list[float] = []
    async with httpx.AsyncClient(
        base_url=up.url, headers={"Authorization": f"Bearer {up.admin}"}, timeout=30
    ) as http:
        for n in range(applies):
            sent = time.perf_counter()
            r = await http.post("/v1/policies", json={"files": {"bench.yaml": POLICY.format(n=n)}})
            version = r.json()["version"]
            deadline = time.monotonic() + 10
            while len(seen.get(version, [])) < sidecars and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            got = seen.get(version, [])
            if len(got) < sidecars:
                print(f"  version {version}: only {len(got)} of {sidecars} within 10 s")
            delays += [(t - sent) * 1000 for t in got]
            await asyncio.sleep(0.2)
    for c in clients:
        await c.stop()
    return delays


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ingest-events", type=int, default=100_000)
    p.add_argument("--store-events", type=int, default=1_000_000)
    p.add_argument("--store-budget", type=float, default=60.0, help="seconds to fill the store")
    p.add_argument("--query-reps", type=int, default=50)
    p.add_argument("--sidecars", type=int, default=20)
    p.add_argument("--applies", type=int, default=10)
    args = p.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        root = Path(tmp)
        (root / "up").mkdir()
        up = Up(root / "up" / "data")
        try:
            rate = bench_ingest(up, args.ingest_events)
            print(
                f"\ningest through the API: {rate:,.0f} events/s ({args.ingest_events:,} events, batches of {BATCH})"
            )
            ok &= check("ingest rate", rate >= 2_000, f"{rate:,.0f} events/s (target >= 2,000)")

            delays = asyncio.run(
                bench_propagation(up, root / "watchers", args.sidecars, args.applies)
            )
        finally:
            up.stop()
        print(
            f"\npolicy propagation to {args.sidecars} sidecars over {args.applies} applies ({len(delays)} samples):"
        )
        p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
        print(
            table(
                ["from apply request to sidecar", "p50 ms", "p99 ms", "max ms"],
                [["in force", p50, p99, max(delays)]],
            )
        )
        ok &= check(
            "propagation p99",
            p99 < 1000 and len(delays) == args.sidecars * args.applies,
            f"{p99:.1f} ms (target < 1000)",
        )

        (root / "store").mkdir()
        stores, n, took = fill_store(root / "store" / "data", args.store_events, args.store_budget)
        try:
            note = (
                "" if n >= args.store_events else f" (time budget {args.store_budget:g} s reached)"
            )
            print(
                f"\nstore filled with {n:,} events in {took:.1f} s ({n / took:,.0f} events/s through mesh/store){note}"
            )
            rows = bench_queries(stores, args.query_reps)
        finally:
            stores.close()
        print(table([f"query over {n:,} events", "p50 ms", "p99 ms"], rows))
        ok &= check("newest-100 p99", rows[0][2] < 50, f"{rows[0][2]:.2f} ms (target < 50)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
