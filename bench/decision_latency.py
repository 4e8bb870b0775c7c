"""Decision latency on the hot path: cached, uncached, and with 10 vs 1000 rules.

Targets (issue 2): a cached decision p50 under 5 µs; an uncached decision (inspect + decide)
on typical PostgreSQL statements p50 under 100 µs; 1000 rules cost at most 2x 10 rules.
"Uncached" texts each have a shape of their own (a table name of their own), so neither
cache hits; "new text, known shape" is pgbench as it runs (`-M simple`), constants new.
Peers in the same run: sqlparse classifying the same statements (what a text-based proxy
would do), so the ratio shows what a real parser costs against it.

MySQL/MariaDB rows, the same three paths: sysbench's OLTP statements as
`--db-ps-mode=disable` sends them and PyMySQL-like ones (literals interpolated by the
client); target for a new text of a known shape p50 under 10 µs (docs/decisions/0012).
Then the shape function and the inspector alone.

    python bench/decision_latency.py
"""

from __future__ import annotations

import re
import sys
from datetime import datetime

import sqlparse
from common import check, percentile, table, time_each

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.sql import mysql, mysql_shape
from policies.sql.inspect import MYSQL, POSTGRES
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
# sysbench oltp_read_write with --db-ps-mode=disable, and statements as PyMySQL sends them
# (`cursor.execute(sql, args)` interpolates the escaped arguments into the text).
MYSQL_TEXTS = (
    "SELECT c FROM sbtest1 WHERE id={a}",
    "SELECT c FROM sbtest1 WHERE id BETWEEN {a} AND {b}",
    "SELECT SUM(k) FROM sbtest1 WHERE id BETWEEN {a} AND {b}",
    "SELECT c FROM sbtest1 WHERE id BETWEEN {a} AND {b} ORDER BY c",
    "SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN {a} AND {b} ORDER BY c",
    "UPDATE sbtest1 SET k=k+1 WHERE id={a}",
    "UPDATE sbtest1 SET c='{c}' WHERE id={a}",
    "DELETE FROM sbtest1 WHERE id={a}",
    "INSERT INTO sbtest1 (id, k, c, pad) VALUES ({a}, {b}, '{c}', '{p}')",
    "SELECT `id`, `email`, `name` FROM `users` WHERE `email` = 'user{a}@example.com' LIMIT 1",
    "INSERT INTO orders (user_id, amount, note, created_at) "
    "VALUES ({a}, {b}.99, 'gift {a}', '2026-11-24 12:{m:02d}:00')",
    "UPDATE users SET last_login = '2026-11-24 12:{m:02d}:01', visits = visits + 1 WHERE id = {a}",
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
            tables = "['pgbench_*', 'sbtest*', orders]" if i < 10 else f"[t{i}, s{i % 7}.u{i}]"
            lines += [
                f"    - name: r{i}",
                f"      from: [app{i % 50}, billing]" if i % 3 else "      from: ['*']",
                f"      sql: {{verbs: [{verb}], tables: {tables}}}",
                f'      when: {{time: "{i % 24:02d}:00-{(i + 3) % 24:02d}:00"}}' if i % 2 else "",
                "      action: " + ("deny" if verb in ("DROP", "TRUNCATE", "DELETE") else "audit"),
            ]
        docs.append("\n".join(line for line in lines if line))
    return Engine(load_texts([(f"p{i}.yaml", d) for i, d in enumerate(docs)]))


def statement(i: int, own_shape: bool = False) -> str:
    """The i-th pgbench text; `own_shape`: on tables of its own (`pgbench_accounts_7`)."""
    text = PGBENCH[i % len(PGBENCH)].format(
        a=i * 7919 % 100000 + 1, t=i % 10 + 1, b=1, d=i % 5000 - 2500
    )
    return re.sub(r"\b(pgbench_\w+)", rf"\g<1>_{i}", text) if own_shape else text


def mysql_statement(i: int, table: str = "sbtest1") -> str:
    """The i-th MySQL text: constants vary with i; `table` names a table of its own (a
    text of a shape not seen before)."""
    c = "-".join(f"{(i * 7919 + k) % 10**11:011d}" for k in range(10))
    text = MYSQL_TEXTS[i % len(MYSQL_TEXTS)].format(
        a=i * 7919 % 100000 + 1, b=i * 31 % 100000 + 1, c=c, p=c[:59], m=i % 60
    )
    return text.replace("sbtest1", table).replace("users", table)


def mysql_rows(
    engines: dict[int, Engine], n: int, results: dict[str, float]
) -> list[tuple[str, object, float, float]]:
    texts = [mysql_statement(i) for i in range(n)]
    fixed = texts[: len(MYSQL_TEXTS)]
    new_shapes = [mysql_statement(i, f"sbtest{i + 2}") for i in range(n)]
    rows: list[tuple[str, object, float, float]] = []
    for rules, engine in engines.items():
        decider = SqlDecider(engine, PEER, MYSQL)
        for text in fixed:
            decider.decide(text, NOW)
        cached = time_each(lambda i, d=decider: d.decide(fixed[i % len(fixed)], NOW), n)
        known = time_each(lambda i, d=decider: d.decide(texts[i], NOW), n)
        assert decider.shape_hits >= len(known) - len(fixed), "the shape cache did not hit"
        decider = SqlDecider(engine, PEER, MYSQL)
        unknown = time_each(lambda i, d=decider: d.decide(new_shapes[i], NOW), n)
        for name, samples in (
            ("mysql cached decision", cached),
            ("mysql new text, known shape", known),
            ("mysql uncached (inspect+decide)", unknown),
        ):
            rows.append((name, rules, percentile(samples, 0.5), percentile(samples, 0.99)))
            results[f"{name}/{rules}"] = percentile(samples, 0.5)
    for name, fn in (
        ("mysql shape only", lambda i: mysql_shape.shape(texts[i])),
        ("mysql inspect only", lambda i: mysql.inspect(texts[i])),
    ):
        samples = time_each(fn, n)
        rows.append((name, "-", percentile(samples, 0.5), percentile(samples, 0.99)))
    return rows


def main() -> int:
    n = 20_000
    texts = [statement(i) for i in range(n)]
    new_shapes = [statement(i, own_shape=True) for i in range(n)]
    engines = {10: policy(10), 1000: policy(1000)}
    rows = []
    results: dict[str, float] = {}

    fixed = [PGBENCH[k].format(a=1, t=1, b=1, d=1) for k in range(len(PGBENCH))]
    for rules, engine in engines.items():
        decider = SqlDecider(engine, PEER, POSTGRES)
        for text in fixed:
            decider.decide(text, NOW)
        cached = time_each(lambda i, d=decider: d.decide(fixed[i % len(fixed)], NOW), n)
        known = time_each(lambda i, d=decider: d.decide(texts[i], NOW), n)
        decider = SqlDecider(engine, PEER, POSTGRES)
        uncached = time_each(lambda i, d=decider: d.decide(new_shapes[i], NOW), n)
        infos = [inspect(t)[0] for t in fixed]
        engine_only = time_each(
            lambda i, e=engine, xs=infos: e.decide(PEER, xs[i % len(xs)], NOW), n
        )
        for name, samples in (
            ("cached decision", cached),
            ("new text, known shape", known),
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
    print("Decision latency, sysbench and PyMySQL-like MySQL statements (µs per statement)\n")
    print(table(("path", "rules", "p50 µs", "p99 µs"), mysql_rows(engines, n, results)))
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
                "mysql new text of a known shape p50 < 10 µs",
                results["mysql new text, known shape/1000"] < 10,
                f"{results['mysql new text, known shape/1000']:.2f} µs with 1000 rules",
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
