"""The PostgreSQL inspector against PostgreSQL's own regression suite, labelled by the server's
parser (../shared/corpus/pg_regress*.jsonl; skipped where the corpus is absent).

The security property is exact: every statement that truly runs a DELETE, DROP or TRUNCATE
(including `ALTER TABLE ... DROP ...`) is reported with that verb or as opaque, and no
statement is reported with one of those verbs that does not run it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policies.sql.model import StatementInfo
from policies.sql.postgres import inspect

pytestmark = pytest.mark.corpus

DANGEROUS = ("DELETE", "DROP", "TRUNCATE")
# Our vocabulary is finer than the labels': fold it onto theirs.
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


def labelled(corpus: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    texts = {}
    with (corpus / "pg_regress.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            texts[row["id"]] = row["sql"]
    with gzip.open(corpus / "pg_regress_labels.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            truth = row["truth"]
            if truth.get("ok") and truth.get("n") == 1:
                yield row["id"], texts[row["id"]], truth


def merged(infos: tuple[StatementInfo, ...]) -> tuple[set[str], bool]:
    verbs: set[str] = set()
    opaque = False
    for info in infos:
        verbs |= info.verbs
        opaque |= info.opaque
    return verbs, opaque


@pytest.fixture(scope="module")
def results(corpus_dir: Path) -> list[tuple[int, str, dict[str, Any], tuple[StatementInfo, ...]]]:
    return [(i, sql, truth, inspect(sql)) for i, sql, truth in labelled(corpus_dir)]


def test_every_destructive_statement_is_seen(results: list[Any]) -> None:
    misses = []
    for i, sql, truth, infos in results:
        verbs, opaque = merged(infos)
        expected = set(truth["effective"]) & set(DANGEROUS)
        if truth.get("alter_drop"):
            expected.add("DROP")
        missing = expected - verbs
        if missing and not opaque:
            misses.append((i, sorted(missing), sql[:120]))
    assert not misses, f"{len(misses)} destructive statements not reported: {misses[:10]}"


def test_no_false_destructive_verbs(results: list[Any]) -> None:
    false = []
    for i, sql, truth, infos in results:
        verbs, _ = merged(infos)
        allowed = set(truth["effective"]) | ({"DROP"} if truth.get("alter_drop") else set())
        extra = (verbs & set(DANGEROUS)) - allowed
        if extra:
            false.append((i, sorted(extra), sql[:120]))
    assert not false, f"{len(false)} false destructive verbs: {false[:10]}"


def test_every_statement_parses_and_top_verbs_agree(results: list[Any]) -> None:
    errors = [(i, infos[0].error) for i, _, _, infos in results if any(x.error for x in infos)]
    assert not errors, f"{len(errors)} labelled-ok statements failed to parse: {errors[:5]}"
    agree = sum(
        FOLD.get(infos[0].verb, infos[0].verb) == truth["verb"] for _, _, truth, infos in results
    )
    assert agree / len(results) >= 0.995, f"top verb agreement {agree / len(results):.4f}"


def test_opaque_statements_are_reported_opaque(results: list[Any]) -> None:
    misses = [
        (i, sql[:100])
        for i, sql, truth, infos in results
        if truth["opaque"] and not merged(infos)[1]
    ]
    assert not misses, f"{len(misses)} opaque statements not flagged: {misses[:10]}"


def test_write_targets_are_among_the_tables(results: list[Any]) -> None:
    misses = []
    for i, sql, truth, infos in results:
        ours = {t for info in infos for t in info.tables}
        missing = set(truth.get("tables") or ()) - ours
        if missing:
            misses.append((i, sorted(missing), sql[:100]))
    assert not misses, f"{len(misses)} statements miss a written table: {misses[:10]}"


def test_no_where_agrees(results: list[Any]) -> None:
    wrong = [
        (i, truth["no_where"], sql[:100])
        for i, sql, truth, infos in results
        if truth.get("no_where") and not any(info.no_where for info in infos)
    ]
    assert not wrong, f"{len(wrong)} UPDATE/DELETE without WHERE not flagged: {wrong[:10]}"


def test_deferred_verbs_are_not_run_now(results: list[Any]) -> None:
    wrong = []
    for i, sql, truth, infos in results:
        for verb in truth.get("deferred") or ():
            if verb in DANGEROUS and verb not in truth["effective"] and merged(infos)[0] & {verb}:
                wrong.append((i, verb, sql[:100]))
    assert not wrong, wrong[:10]
