"""Decision latency on the hot path: cached, uncached, and with 10 vs 1000 rules.

Targets (issue 2): a cached decision p50 under 5 µs; an uncached decision (inspect + decide)
on typical PostgreSQL statements p50 under 100 µs; 1000 rules cost at most 2x 10 rules.
Peers in the same run: sqlparse classifying the same statements (what a text-based proxy
would do), so the ratio shows what a real parser costs against it.

    python bench/decision_latency.py
"""

from __future__ import annotations

import sys
from datetime import datetime

import sqlparse
from common import check, percentile, table, time_each

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.sql.inspect import POSTGRES
from policies.sql.postgres import inspect

NOW = datetime.fromisoformat("2026-11-24T12:00:00+00:00").timestamp()
PEER = Peer("billing", "orders-db", "billing-1")

# pgbench's TPC-B-like transaction, with the constants a run would send.
PGBENCH = (
    "UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {a}",
    "SELECT abalance FROM pgbench_accounts WHERE aid = {a}",
    "UPDATE pgbench_tellers SET tbalance = tbalance + {d} WHERE tid = {t}",
    "UPDATE pgbench_branches SET bbalance = bbalance + {d} WHERE bid = {b}",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({t}, {b}, {a}, {d}, CURRENT_TIMESTAMP)",
)
VERBS = ("SELECT", "INSERT", "UPDATE", "DELETE", "DROP", "TRUNCATE", "ALTER", "CREATE", "GRANT")


def policy(rules: int) -> Engine:
    """Ten rules that concern pgbench's tables, plus `rules - 10` rules on orders-db that
    concern other tables or other source apps, plus as many on another destination. Half
    have time windows; a third apply to every source app."""
    docs = []
    for dest in ("orders-db", "payments-db"):
        lines = [
            "apiVersion: sluice/v1",
            "kind: Policy",
            f"metadata: {{name: {dest}-bench}}",
            "spec:",
            f"  destination: {dest}",
            "  timezone: Europe/London",
            "  rules:",
        ]
        for i in range(rules):
            verb = VERBS[i % len(VERBS)]
            tables = "['pgbench_*', orders]" if i < 10 else f"[t{i}, s{i % 7}.u{i}]"
            lines += [
                f"    - name: r{i}",
                f"      from: [app{i % 50}, billing]" if i % 3 else "      from: ['*']",
                f"      sql: {{verbs: [{verb}], tables: {tables}}}",
                f'      when: {{time: "{i % 24:02d}:00-{(i + 3) % 24:02d}:00"}}' if i % 2 else "",
                "      action: " + ("deny" if verb in ("DROP", "TRUNCATE", "DELETE") else "audit"),
            ]
        docs.append("\n".join(line for line in lines if line))
    return Engine(load_texts([(f"p{i}.yaml", d) for i, d in enumerate(docs)]))


def statement(i: int) -> str:
    return PGBENCH[i % len(PGBENCH)].format(
        a=i * 7919 % 100000 + 1, t=i % 10 + 1, b=1, d=i % 5000 - 2500
    )


def main() -> int:
    n = 20_000
    texts = [statement(i) for i in range(n)]
    engines = {10: policy(10), 1000: policy(1000)}
    rows = []
    results: dict[str, float] = {}

    fixed = [PGBENCH[k].format(a=1, t=1, b=1, d=1) for k in range(len(PGBENCH))]
    for rules, engine in engines.items():
        decider = SqlDecider(engine, PEER, POSTGRES)
        for text in fixed:
            decider.decide(text, NOW)
        cached = time_each(lambda i, d=decider: d.decide(fixed[i % len(fixed)], NOW), n)
        decider = SqlDecider(engine, PEER, POSTGRES)
        uncached = time_each(lambda i, d=decider: d.decide(texts[i], NOW), n)
        infos = [inspect(t)[0] for t in fixed]
        engine_only = time_each(
            lambda i, e=engine, xs=infos: e.decide(PEER, xs[i % len(xs)], NOW), n
        )
        for name, samples in (
            ("cached decision", cached),
            ("uncached (inspect+decide)", uncached),
            ("engine only", engine_only),
        ):
            rows.append(
                (f"sluice {name}", rules, percentile(samples, 0.5), percentile(samples, 0.99))
            )
            results[f"{name}/{rules}"] = percentile(samples, 0.5)

    inspect_only = time_each(lambda i: inspect(texts[i]), n)
    sqlparse_only = time_each(lambda i: sqlparse.parse(texts[i])[0].get_type(), min(n, 3000))
    rows.append(
        ("pglast inspect only", "-", percentile(inspect_only, 0.5), percentile(inspect_only, 0.99))
    )
    rows.append(
        (
            "sqlparse get_type (peer)",
            "-",
            percentile(sqlparse_only, 0.5),
            percentile(sqlparse_only, 0.99),
        )
    )

    print("Decision latency, pgbench TPC-B statements, one core (µs per statement)\n")
    print(table(("path", "rules", "p50 µs", "p99 µs"), rows))
    print()
    scale = results["engine only/1000"] / results["engine only/10"]
    scale_uncached = (
        results["uncached (inspect+decide)/1000"] / results["uncached (inspect+decide)/10"]
    )
    print(
        f"ratio sqlparse / sluice inspect (p50): {percentile(sqlparse_only, 0.5) / percentile(inspect_only, 0.5):.1f}x"
    )
    print(
        f"ratio 1000 rules / 10 rules: engine {scale:.2f}x, uncached decision {scale_uncached:.2f}x\n"
    )
    ok = all(
        [
            check(
                "cached p50 < 5 µs",
                results["cached decision/1000"] < 5,
                f"{results['cached decision/1000']:.2f} µs with 1000 rules",
            ),
            check(
                "uncached p50 < 100 µs",
                results["uncached (inspect+decide)/1000"] < 100,
                f"{results['uncached (inspect+decide)/1000']:.1f} µs with 1000 rules",
            ),
            check(
                "1000 rules <= 2x 10 rules",
                scale <= 2 and scale_uncached <= 2,
                f"engine {scale:.2f}x, uncached {scale_uncached:.2f}x",
            ),
        ]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
