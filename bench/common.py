"""Shared helpers for the benchmarks: bounded timing loops, percentiles and tables."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SLUICE_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "corpus"


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_each(fn: Callable[[int], object], count: int, budget_s: float = 5.0) -> list[float]:
    """Call fn(i) up to `count` times (stopping after `budget_s`); microseconds per call."""
    out: list[float] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    for i in range(count):
        t0 = clock()
        fn(i)
        t1 = clock()
        out.append((t1 - t0) / 1000)
        if t1 > deadline:
            break
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def check(label: str, ok: bool, detail: str) -> bool:
    print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {detail}")
    return ok


def need_corpus(name: str) -> bool:
    if not (CORPUS / name).is_file():
        print(
            f"corpus {CORPUS / name} not found (set SLUICE_SHARED to the shared/ folder); skipped"
        )
        return False
    return True


def flush() -> None:
    sys.stdout.flush()


# --- the policy set the sidecar benchmarks run with -------------------------------------

OTHER_TABLES = ("orders", "order_items", "customers", "invoices", "shipments", "refunds")


def guard_policy(
    name: str, *, bench_tables: str, dry_run_table: str, audit_verb: str, write_verbs: str
) -> str:
    """24 rules on orders-db, what a real guard holds, none denying the benchmark's own
    statements: deny, limit, audit and dry-run rules, time windows, source apps, tables."""
    rules = [
        "- {name: no-drop-truncate, sql: {verbs: [DROP, TRUNCATE]}, action: deny}",
        "- {name: no-unbounded-writes, sql: {verbs: [DELETE, UPDATE], where: absent}, action: deny}",
        f"- {{name: night-freeze, sql: {{verbs: [DELETE], tables: ['{bench_tables}']}}, when: {{time: '01:00-03:00'}}, action: deny}}",
        "- {name: weekday-ddl, sql: {verbs: [ALTER, CREATE]}, when: {time: '08:00-18:00', days: [mon, tue, wed, thu, fri]}, action: deny}",
        "- {name: weekend-ddl, sql: {verbs: [ALTER]}, when: {time: '00:00-06:00', days: [sat, sun]}, action: deny}",
        "- {name: audit-grants, sql: {verbs: [GRANT, REVOKE]}, action: audit}",
        f"- {{name: audit-{audit_verb.lower()}, sql: {{verbs: [{audit_verb}]}}, action: audit}}",
        "- {name: no-lock, sql: {verbs: [LOCK]}, action: deny}",
        "- {name: no-opaque-at-night, sql: {verbs: [CALL, DO]}, when: {time: '22:00-06:00'}, action: deny}",
        f"- {{name: reporting-read-only, from: [reporting], sql: {{verbs: [{write_verbs}]}}, action: deny}}",
        f"- {{name: analytics-budget, from: [analytics], sql: {{verbs: [SELECT], tables: ['{bench_tables}']}}, action: limit, limit: {{rate: 50}}}}",
        "- {name: batch-off-hours, from: ['batch-*'], sql: {verbs: [SELECT]}, when: {time: '08:00-18:00'}, action: deny}",
        "- {name: web-deletes, from: [web], sql: {verbs: [DELETE]}, action: audit}",
        "- {name: billing-no-ddl, from: [billing], sql: {verbs: [CREATE, ALTER, DROP]}, action: deny}",
        f"- {{name: dry-run-{dry_run_table.replace('_', '-')}, sql: {{verbs: [DELETE], tables: [{dry_run_table}]}}, action: deny, enforce: false}}",
    ]
    for i, table_name in enumerate(OTHER_TABLES):
        verbs = ("INSERT", "UPDATE", "SELECT")[i % 3]
        rules.append(
            f"- {{name: {table_name}-budget, sql: {{verbs: [{verbs}], tables: [{table_name}]}}, "
            f"action: limit, limit: {{rate: 100000, burst: 100000}}}}"
        )
    rules += [
        "- {name: orders-delete-window, sql: {verbs: [DELETE], tables: [orders, order_items]}, when: {time: '12:00-13:00'}, action: deny}",
        "- {name: customers-pii, from: [web, reporting], sql: {verbs: [SELECT], tables: [customers]}, action: audit}",
        "- {name: invoices-immutable, sql: {verbs: [UPDATE, DELETE], tables: [invoices]}, action: deny}",
    ]
    head = (
        f"apiVersion: sluice/v1\nkind: Policy\nmetadata: {{name: {name}}}\n"
        "spec:\n  destination: orders-db\n  timezone: UTC\n  rules:\n"
    )
    return head + "".join(f"    {r}\n" for r in rules)


def write_policy_file(tmp: Path, text: str, sluice: Path) -> Path:
    """Write the policy set and check it with `sluice policy check`; exit if it is rejected."""
    path = tmp / "policies.yaml"
    path.write_text(text)
    argv = [str(sluice), "policy", "check", str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"generated policy set rejected:\n{out.stdout}{out.stderr}")
    print(f"policy set: {(out.stdout + out.stderr).strip()}")
    return path
