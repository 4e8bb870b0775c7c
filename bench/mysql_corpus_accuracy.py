"""MySQL/MariaDB inspector accuracy and speed on the MySQL/MariaDB grammar corpus, against sqlparse.

Each statement of ../shared/corpus/mysql_grammars_labels.jsonl was run on a real MariaDB,
which labelled it with the verb of the `Com_*` counter it moved (`server_verb`), or with
PARSE_ERROR / NO_COUNTER when it failed. For the statements the server ran, both inspectors
are asked what they run:

- security misses: the server ran DELETE, DROP or TRUNCATE and the inspector reports neither
  that verb, nor "opaque", nor a parse error (which the engine denies on guarded routes);
- verb agreement: the inspector's verbs hold the server's (Sluice reports REPLACE with INSERT
  and RENAME with ALTER); the server files SHOW and LOCK under OTHER, REVOKE under GRANT;
- µs per statement (p50/p99), each statement timed once after a warm-up pass.

sqlparse's `get_type()` is what a text-based proxy would use; it has no notion of opaque.

    python bench/mysql_corpus_accuracy.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import sqlparse
from common import CORPUS, need_corpus, percentile, table

from policies.sql.mysql import inspect

LABELS = "mysql_grammars_labels.jsonl"
DANGEROUS = {"DELETE", "DROP", "TRUNCATE"}
NOT_RUN = {"PARSE_ERROR", "NO_COUNTER"}
# How the server's counters file verbs that Sluice names on their own.
SERVER_NAMES = {"SHOW": "OTHER", "LOCK": "OTHER", "REVOKE": "GRANT"}

Verdict = tuple[set[str], bool]  # (verbs, opaque or parse error)


def load(limit: int) -> list[tuple[str, str]]:
    """(sql, server_verb) for each statement the server ran."""
    rows = []
    with (CORPUS / LABELS).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["server_verb"] not in NOT_RUN:
                rows.append((row["sql"], row["server_verb"]))
                if len(rows) >= limit:
                    break
    return rows


def sluice(sql: str) -> Verdict:
    infos = inspect(sql)
    verbs = {SERVER_NAMES.get(i.verb, i.verb) for i in infos} | {v for i in infos for v in i.verbs}
    return verbs, any(i.opaque or not i.ok for i in infos)


def with_sqlparse(sql: str) -> Verdict:
    statements = sqlparse.parse(sql)
    return ({statements[0].get_type()} if statements else set()), False


def evaluate(
    name: str,
    fn: Callable[[str], Verdict],
    rows: list[tuple[str, str]],
    per_verb: dict[str, list[int]],
) -> tuple[list[object], float]:
    """The table row for one inspector, and its p50 µs; `per_verb[verb]` collects
    (statements the server counted as verb, of which reported with it)."""
    for sql, _ in rows:  # warm-up: caches, imports
        fn(sql)
    misses = agree = 0
    samples: list[float] = []
    clock = time.perf_counter_ns
    for sql, server_verb in rows:
        t0 = clock()
        verbs, unseen = fn(sql)
        samples.append((clock() - t0) / 1000)
        agree += server_verb in verbs
        counts = per_verb.setdefault(server_verb, [0, 0])
        counts[0] += 1
        counts[1] += server_verb in verbs
        misses += server_verb in DANGEROUS and server_verb not in verbs and not unseen
    p50 = percentile(samples, 0.5)
    return [name, len(rows), misses, 100 * agree / len(rows), p50, percentile(samples, 0.99)], p50


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=50_000, help="statements to use (default: all)")
    args = ap.parse_args()
    if not need_corpus(LABELS):
        return 0
    rows = load(args.limit)
    dangerous = sum(1 for _, verb in rows if verb in DANGEROUS)
    print(
        f"MySQL/MariaDB grammar corpus: {len(rows)} statements the server ran, "
        f"{dangerous} of them DELETE/DROP/TRUNCATE\n"
    )
    ours_verbs: dict[str, list[int]] = {}
    theirs_verbs: dict[str, list[int]] = {}
    ours, ours_p50 = evaluate("sluice (mysql lexer)", sluice, rows, ours_verbs)
    theirs, theirs_p50 = evaluate("sqlparse get_type", with_sqlparse, rows, theirs_verbs)
    headers = ("inspector", "statements", "security misses", "verb agreement %", "p50 µs", "p99 µs")
    print(table(headers, [ours, theirs]))
    print("\nPer verb (the server's Com_* counter): statements, and the share each reports\n")
    verb_rows = [
        (verb, n, 100 * found / n, 100 * theirs_verbs[verb][1] / n)
        for verb, (n, found) in sorted(ours_verbs.items())
    ]
    print(table(("verb", "statements", "sluice %", "sqlparse %"), verb_rows))
    print(f"\nspeed ratio sqlparse / sluice (p50): {theirs_p50 / ours_p50:.1f}x")
    return 0 if ours[2] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
