"""PostgreSQL fast shapes (policies/sql/pg_fastshape.py): what one replaces is exactly what
PostgreSQL's own lexer (libpg_query's, through pglast) reads as integer and string
literals; texts of one shape inspect alike; there is no shape wherever the argument for
sharing a decision could fail. Every case runs against the pure Python function and its
Cython build, the one the sidecar uses."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parser

from policies.sql import pg_fastshape
from policies.sql.model import StatementInfo
from policies.sql.pg_fastshape import MARK
from policies.sql.postgres import inspect
from tests.compiled import compiled_build

Shape = Callable[[str], "str | None"]


def compiled() -> Shape:
    fast: Shape = compiled_build(pg_fastshape).fast_shape
    return fast


@pytest.fixture(params=["pure", "compiled"])
def fast_shape(request: pytest.FixtureRequest) -> Shape:
    return pg_fastshape.fast_shape if request.param == "pure" else compiled()


def lexer_shape(sql: str) -> str | None:
    """The shape as PostgreSQL's lexer reads the text: its integer and string literal tokens
    replaced; None where it reads another kind of literal or a parameter (or cannot lex)."""
    try:
        tokens = parser.scan(sql)  # offsets in characters, the end inclusive
    except parser.ParseError:
        return None
    out, pos = [], 0
    for token in tokens:
        text = sql[token.start : token.end + 1]
        if token.name == "SCONST" and text.startswith("'"):
            mark = "$s"
        elif token.name in ("ICONST", "FCONST") and text.isdigit():  # FCONST: past int32
            mark = "$i"
        elif token.name in ("ICONST", "FCONST", "SCONST", "BCONST", "XCONST", "PARAM", "USCONST"):
            return None
        else:
            continue
        out += [sql[pos : token.start], mark]
        pos = token.end + 1
    return MARK + "".join([*out, sql[pos:]])


def read(sql: str) -> tuple[StatementInfo, ...]:
    """The inspection without byte offsets (literals of other lengths move them), with parse
    errors reduced to the fact of one (their messages quote the text)."""
    return tuple(
        replace(info, span=None) if info.ok else replace(info, span=None, error="error")
        for info in inspect(sql)
    )


# Integer and string literals to vary a text's own with, without changing their kinds.
INTEGERS = ["0", "7", "42", "2147483647"]
STRINGS = ["''", "'x'", "'DROP TABLE secret; -- '", "'it''s'", "'é'", "'$$'", "'/*'", "'1'"]


def vary(sql: str, rng: random.Random) -> str:
    """`sql` with every integer and string literal the lexer reads replaced by another."""
    out, pos = [], 0
    for token in parser.scan(sql):
        if token.name in ("ICONST", "SCONST"):
            out += [
                sql[pos : token.start],
                rng.choice(INTEGERS if token.name == "ICONST" else STRINGS),
            ]
            pos = token.end + 1
    return "".join([*out, sql[pos:]])


ACCEPTED = [
    (
        "SELECT abalance FROM pgbench_accounts WHERE aid = 4711;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $i;",
    ),
    (
        "select 1,2, 'a''b' from t where a in (3,4) limit 5",
        "select $i,$i, $s from t where a in ($i,$i) limit $i",
    ),
    ("UPDATE t SET a = 5, b = 'x' WHERE id = 7", "UPDATE t SET a = $i, b = $s WHERE id = $i"),
    ("DELETE FROM orders WHERE id = 12", "DELETE FROM orders WHERE id = $i"),
    (
        "INSERT INTO t (a, b) VALUES (1, 'two'), (3, '')",
        "INSERT INTO t (a, b) VALUES ($i, $s), ($i, $s)",
    ),
    ('select "a""b", 1 from "T 1"', 'select "a""b", $i from "T 1"'),
    ("SELECT x::varchar(10) FROM t ORDER BY 1", "SELECT x::varchar($i) FROM t ORDER BY $i"),
    ("SELECT 'é', ünï FROM t WHERE x = 5", "SELECT $s, ünï FROM t WHERE x = $i"),
    ("SELECT interval '1 day', date '2020-01-01'", "SELECT interval $s, date $s"),
    ("SELECT a[1:2] FROM t", "SELECT a[$i:$i] FROM t"),
    ("SELECT 99999999999", "SELECT $i"),
    ("SELECT 'a' || 'b'", "SELECT $s || $s"),
    ("SELECT 1;  \n", "SELECT $i;  \n"),
    ("  select\n\t1", "  select\n\t$i"),
]


@pytest.mark.parametrize(("sql", "expected"), ACCEPTED)
def test_integer_and_string_literals_are_replaced(
    fast_shape: Shape, sql: str, expected: str
) -> None:
    assert fast_shape(sql) == MARK + expected
    assert lexer_shape(sql) == MARK + expected


REFUSED = [
    "",
    "   ",
    "SELECT -1",  # a minus folds into the literal only where the grammar says
    "SELECT a-1 FROM t",
    "SELECT 1.5",
    "SELECT 1e3",
    "SELECT .5",
    "SELECT 1.",
    "SELECT 0x1F",
    "SELECT 1_000",
    "SELECT 1abc",
    "SELECT $1",
    "SELECT $$x$$",
    "SELECT $q$x$q$",
    "select a$b from t",
    "SELECT E'a'",
    "SELECT e'\\x41'",
    "SELECT B'101'",
    "SELECT X'1f'",
    "SELECT N'a'",
    "SELECT U&'d\\0061t'",
    'SELECT U&"d"',
    "SELECT 'a'\n'b'",  # the lexer joins these into one literal
    "SELECT 'a' \n  'b'",
    "SELECT 'a\\'",
    "SELECT 1 -- comment",
    "SELECT /* comment */ 1",
    "SELECT 1 / 2",
    "SELECT 1; SELECT 2",
    "SELECT 1; DROP TABLE t",
    "SELECT 'unterminated",
    'SELECT "unterminated',
    "SELECT\f1",
    "SELECT\v1",
    "SELECT\x001",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "(SELECT 1)",
    "TABLE t",
    "VALUES (1)",
    "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
    "DO 'BEGIN DELETE FROM t; END'",
    "COPY t FROM '/etc/passwd'",
    "CREATE TABLE t (a int DEFAULT 1)",
    "PREPARE p AS DELETE FROM t WHERE id = 1",
    "EXECUTE p(1)",
    "CALL p(1)",
    "SET search_path = 'x'",
    "NOTIFY c, 'payload'",
    "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
    "SELECT execute FROM t WHERE id = 1",  # a word that could be a sensitive keyword
    "SELECT * FROM t WHERE id = 1 AND f(2) & 3 = 3",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_no_shape(fast_shape: Shape, sql: str) -> None:
    assert fast_shape(sql) is None


def test_a_fast_shape_never_equals_a_normalised_one(fast_shape: Shape) -> None:
    shape = fast_shape("SELECT 1")
    assert shape is not None and shape.startswith(MARK) and MARK not in parser.normalize("SELECT 1")


DML = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 4711",
    "SELECT * FROM orders o JOIN items i ON i.order_id = o.id WHERE o.total > 100 LIMIT 10",
    "SELECT count(*) FROM t WHERE a IN (1, 2, 3) GROUP BY b HAVING count(*) > 2 ORDER BY 1",
    "SELECT nextval('orders_seq'), set_config('search_path', 'public', false)",
    "SELECT dblink_exec('conn', 'DROP TABLE users')",
    "SELECT query_to_xml('DELETE FROM t', true, false, '')",
    "SELECT * FROM t WHERE name LIKE 'a%' AND created > date '2024-01-01'",
    "SELECT x::numeric(10, 2), y::varchar(5) FROM t FETCH FIRST 3 ROWS ONLY",
    "SELECT * INTO archive FROM orders WHERE id < 1000",
    "SELECT * FROM t FOR UPDATE",
    "SELECT (SELECT max(id) FROM u WHERE u.k = 'x') FROM t OFFSET 5",
    "UPDATE accounts SET balance = balance + 10 WHERE id = 7",
    "UPDATE accounts SET note = 'DELETE FROM accounts' WHERE id = 7",
    "UPDATE t SET a = 1",
    "DELETE FROM orders WHERE id = 12",
    "DELETE FROM orders",
    "DELETE FROM orders USING items WHERE items.id = orders.item AND items.kind = 'gone'",
    "INSERT INTO t (a, b) VALUES (1, 'two'), (3, '')",
    "INSERT INTO t SELECT * FROM u WHERE id > 3",
    "INSERT INTO logs VALUES ('DROP TABLE users')",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT lo_import('/etc/passwd', 1)",
    "SELECT pg_terminate_backend(42)",
]


@pytest.mark.parametrize("sql", DML)
def test_texts_of_one_shape_inspect_alike(fast_shape: Shape, sql: str) -> None:
    shape = fast_shape(sql)
    assert shape is not None
    rng = random.Random(sql)
    for _ in range(12):
        other = vary(sql, rng)
        assert fast_shape(other) == shape, other
        assert read(other) == read(sql), other


# Texts from a small alphabet of PostgreSQL's tokens and of the characters the fast lexer
# must get right, after a first word it accepts.
_PIECES = st.sampled_from(
    [
        " ",
        "\n",
        "\t",
        "\r",
        ",",
        "(",
        ")",
        "=",
        "::",
        ":",
        ";",
        "*",
        "+",
        "<",
        ">",
        "!",
        "~",
        ".",
        "[",
        "]",
        "1",
        "42",
        "007",
        "1.5",
        "1e3",
        ".5",
        "x",
        "t1",
        "_a",
        "é",
        "abc",
        "e",
        "u",
        "n",
        "b",
        "'",
        "''",
        "'a'",
        "'it''s'",
        '"',
        '"q"',
        '"a""b"',
        "\\",
        "$",
        "$1",
        "-",
        "--",
        "/",
        "/*",
        "*/",
        "&",
        "from",
        "where",
        "do",
        "copy",
        "select",
        "\f",
    ]
)
_TEXTS = st.builds(
    lambda first, rest: first + "".join(rest),
    st.sampled_from(["SELECT ", "select\n", "INSERT ", "UPDATE ", "DELETE ", "Select\t"]),
    st.lists(_PIECES, max_size=14),
)


@settings(max_examples=1500, deadline=None)
@given(_TEXTS)
def test_a_shape_is_what_the_lexer_reads_in_any_text(sql: str) -> None:
    pure = pg_fastshape.fast_shape(sql)
    assert compiled()(sql) == pure
    if pure is not None:
        assert pure == lexer_shape(sql), sql


@pytest.mark.corpus
def test_corpus_shapes_are_read_as_the_lexer_reads_and_inspect_alike(corpus_dir: Path) -> None:
    fast = compiled()
    shaped = varied = 0
    rng = random.Random(15)
    with (corpus_dir / "pg_regress.jsonl").open() as f:
        for line in f:
            sql = json.loads(line)["sql"]
            shape = fast(sql)
            assert shape == pg_fastshape.fast_shape(sql), sql
            if shape is None:
                continue
            shaped += 1
            assert shape == lexer_shape(sql), sql
            if len(sql) > 2000 or not any(info.ok for info in inspect(sql)):
                continue
            other = vary(sql, rng)
            if other != sql:
                varied += 1
                assert fast(other) == shape, (sql, other)
                assert read(other) == read(sql), (sql, other)
    # Of the suite's statements, about 16k have a fast shape and 13k of those parse and have
    # literals to vary (counted on 2026-11-26).
    assert shaped > 12000 and varied > 10000, (shaped, varied)
