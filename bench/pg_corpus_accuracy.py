"""PostgreSQL inspector accuracy and speed on PostgreSQL's regression suite, against sqlparse.

For each labelled statement of ../shared/corpus/pg_regress*.jsonl (labels come from
PostgreSQL's own parser; see the corpus README), both inspectors are asked what it runs:

- security misses: the statement truly runs DELETE, DROP or TRUNCATE (or ALTER ... DROP) and
  the inspector reports neither that verb nor "opaque";
- false alarms: the inspector reports one of those verbs and the statement does not run it;
- top-verb agreement, and µs per statement (p50/p99).

sqlparse's `get_type()` is what a text-based proxy would use; it has no notion of opaque.

    python bench/pg_corpus_accuracy.py [--limit N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time

import sqlparse
from common import CORPUS, need_corpus, percentile, table

from policies.sql.postgres import inspect

DANGEROUS = {"DELETE", "DROP", "TRUNCATE"}
FOLD = {
    "CALL": "CALL/DO",
    "DO": "CALL/DO",
    "REVOKE": "GRANT",
    "PREPARE": "OTHER",
    "EXECUTE": "OTHER",
    "DEALLOCATE": "OTHER",
    "LOCK": "OTHER",
    "SHOW": "OTHER",
}
SQLPARSE_FOLD = {"UNKNOWN": "OTHER", "REPLACE": "OTHER"}


def load(limit: int) -> list[tuple[str, dict[str, object]]]:
    texts = {}
    with (CORPUS / "pg_regress.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            texts[row["id"]] = row["sql"]
    out = []
    with gzip.open(CORPUS / "pg_regress_labels.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            truth = row["truth"]
            if truth.get("ok") and truth.get("n") == 1:
                out.append((texts[row["id"]], truth))
                if len(out) >= limit:
                    break
    return out


def sluice(sql: str) -> tuple[str, set[str], bool]:
    infos = inspect(sql)
    verbs = {v for i in infos for v in i.verbs}
    return (infos[0].verb if infos else "OTHER"), verbs, any(i.opaque for i in infos)


def with_sqlparse(sql: str) -> tuple[str, set[str], bool]:
    kind = sqlparse.parse(sql)[0].get_type()
    return kind, {kind}, False


def evaluate(name: str, fn, rows, fold, per_verb) -> tuple[list[object], list[float]]:
    """Score one inspector; `per_verb[verb]` collects (found, reported-without-truth) counts."""
    misses = false = agree = 0
    samples: list[float] = []
    clock = time.perf_counter_ns
    for sql, truth in rows:
        t0 = clock()
        verb, verbs, opaque = fn(sql)
        samples.append((clock() - t0) / 1000)
        folded = {fold.get(v, v) for v in verbs}
        effective = set(truth["effective"]) | ({"DROP"} if truth.get("alter_drop") else set())
        for v in effective | folded:
            counts = per_verb.setdefault(v, [0, 0, 0])
            if v in effective:
                counts[0] += 1
                counts[1] += v in folded
            else:
                counts[2] += 1
        expected = set(truth["effective"]) & DANGEROUS | (
            {"DROP"} if truth.get("alter_drop") else set()
        )
        if expected - verbs and not opaque:
            misses += 1
        allowed = set(truth["effective"]) | ({"DROP"} if truth.get("alter_drop") else set())
        if (verbs & DANGEROUS) - allowed:
            false += 1
        agree += fold.get(verb, verb) == truth["verb"]
    row = [
        name,
        len(rows),
        misses,
        false,
        100 * agree / len(rows),
        percentile(samples, 0.5),
        percentile(samples, 0.99),
    ]
    return row, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50_000, help="statements to use (default: all)")
    args = ap.parse_args()
    if not need_corpus("pg_regress.jsonl"):
        return 0
    rows = load(args.limit)
    destructive = sum(1 for _, t in rows if set(t["effective"]) & DANGEROUS or t.get("alter_drop"))
    print(
        f"PostgreSQL regression corpus: {len(rows)} statements, {destructive} run DELETE/DROP/TRUNCATE\n"
    )
    ours_verbs: dict[str, list[int]] = {}
    theirs_verbs: dict[str, list[int]] = {}
    ours, ours_t = evaluate("sluice (pglast)", sluice, rows, FOLD, ours_verbs)
    theirs, theirs_t = evaluate(
        "sqlparse get_type", with_sqlparse, rows, SQLPARSE_FOLD, theirs_verbs
    )
    print(
        table(
            (
                "inspector",
                "statements",
                "security misses",
                "false alarms",
                "top verb %",
                "p50 µs",
                "p99 µs",
            ),
            [ours, theirs],
        )
    )
    print("\nPer verb: statements that truly run it, the share each inspector reports, and")
    print("'extra': statements reported with the verb that do not run it.\n")
    verb_rows = []
    for verb in sorted(v for v in ours_verbs if ours_verbs[v][0]):
        o, t = ours_verbs[verb], theirs_verbs.get(verb, [0, 0, 0])
        verb_rows.append((verb, o[0], 100 * o[1] / o[0], o[2], 100 * t[1] / o[0], t[2]))
    headers = ("verb", "truth", "sluice %", "sluice extra", "sqlparse %", "sqlparse extra")
    print(table(headers, verb_rows))
    ratio = percentile(theirs_t, 0.5) / percentile(ours_t, 0.5)
    print(f"\nspeed ratio sqlparse / sluice (p50): {ratio:.1f}x")
    return 0 if ours[2] == 0 and ours[3] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
