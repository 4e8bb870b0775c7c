"""MySQL/MariaDB statement shapes: literals replaced and nothing else, no shape wherever a
merge could change a decision, and the shape read exactly as the lexer reads the text."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.sql.model import StatementInfo
from policies.sql.mysql import inspect
from policies.sql.mysql_lexer import (
    BIT,
    HEX,
    LITERALS,
    NUMBER,
    SEMI,
    STRING,
    WHITESPACE,
    WORD,
    LexError,
    tokenize,
)
from policies.sql.mysql_shape import CONSTANT_SENSITIVE, PLACEHOLDERS, shape


def options(ansi: bool = False, nbe: bool = False) -> dict[str, bool | int]:
    return {
        "server_version": 101100,
        "mariadb": True,
        "ansi_quotes": ansi,
        "no_backslash_escapes": nbe,
    }


def read(sql: str, ansi: bool = False, nbe: bool = False) -> tuple[StatementInfo, ...]:
    """The inspection, with parse errors reduced to the fact of one: their messages quote
    the text (`unrecognised statement starting with '1'`), and the decider never shares a
    result with an error by shape."""
    return tuple(
        info if info.ok else replace(info, error="error")
        for info in inspect(sql, **options(ansi, nbe))
    )


def lexer_shape(sql: str, ansi: bool) -> str:
    """The shape as the real lexer reads the text (raises LexError where it does)."""
    out, pos = [], 0
    for token in tokenize(sql, **options(ansi)):
        if token.kind in LITERALS:
            out += [sql[pos : token.start], PLACEHOLDERS[token.kind]]
            pos = token.end
    return "".join(out) + sql[pos:]


# Literals of each kind, to vary a text's literals without changing their kinds.
VARIANTS = {
    STRING: ["'zz'", "''", "'DROP TABLE secret; -- '", "N'q'", "_utf8mb4'*/'"],
    NUMBER: ["7", "8.5", "9e3", ".25"],
    HEX: ["X'ff'", "0xAB"],
    BIT: ["b'1'", "0b10"],
}


def vary(sql: str, ansi: bool, rng: random.Random) -> str:
    """`sql` with every literal the lexer reads replaced by another of its kind."""
    out, pos = [], 0
    for token in tokenize(sql, **options(ansi)):
        if token.kind in LITERALS:
            out += [sql[pos : token.start], rng.choice(VARIANTS[token.kind])]
            pos = token.end
    return "".join(out) + sql[pos:]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT c FROM sbtest1 WHERE id=5012", "SELECT c FROM sbtest1 WHERE id=\0n"),
        ("SELECT 'a''b', \"x\", N'q', _utf8mb4'z' FROM t", "SELECT \0s, \0s, \0s, \0s FROM t"),
        (
            "SELECT X'ab', 0x1F, b'01', 0b1, 1.5e3, .5, -2",
            "SELECT \0x, \0x, \0b, \0b, \0n, \0n, -\0n",
        ),
        ("SELECT `a``b`, @v, @@session.sql_mode, ?", "SELECT `a``b`, @v, @@session.sql_mode, ?"),
        ("SELECT abc1, t.5 FROM t", "SELECT abc1, t\0n FROM t"),
        ("SELECT 'do it; DROP TABLE t' FROM t", "SELECT \0s FROM t"),  # words in strings
        ("SELECT dox, doc FROM t", "SELECT dox, doc FROM t"),
        ("SELECT * FROM t LIMIT 10 OFFSET 20", "SELECT * FROM t LIMIT \0n OFFSET \0n"),
        ("  SELECT\t1\n", "  SELECT\t\0n\n"),
    ],
)
def test_literals_are_replaced(sql: str, expected: str) -> None:
    assert shape(sql) == expected == lexer_shape(sql, False)


def test_ansi_quotes_make_double_quotes_part_of_the_shape() -> None:
    assert shape('SELECT "x" FROM t') == "SELECT \0s FROM t"
    assert shape('SELECT "x" FROM t', ansi_quotes=True) == 'SELECT "x" FROM t'
    assert shape('SELECT "it\'s" FROM t', ansi_quotes=True) is None


@pytest.mark.parametrize(
    "sql",
    [
        # Comments of every kind: executable ones run SQL depending on the server version,
        # plain ones can split keywords; `--` without a space is two minus signs.
        "SELECT 1 /*!50000 , 2 */",
        "SELECT 1 /*!99999 ; DROP TABLE t */",
        "/*M!100000 DROP TABLE t */",
        "SELECT 1 /* plain */",
        "DEL/**/ETE FROM t",
        "SELECT 1 */",
        "DELETE FROM t -- WHERE id = 1",
        "DELETE FROM t # WHERE id = 1",
        "SELECT 1--1",
        # A backslash means something else under NO_BACKSLASH_ESCAPES.
        "SELECT 'a\\'; DROP TABLE t; -- '",
        "SELECT 'a\\\\'",
        "SELECT 1 \\",
        # More than one statement, or a trailing `;`.
        "SELECT 1; DROP TABLE t",
        "SELECT 1;",
        # Statements whose constants can be SQL or whose inspection is special.
        "EXECUTE IMMEDIATE 'DROP TABLE t'",
        "PREPARE s FROM 'DROP TABLE t'",
        "ExEcUtE s USING @a",
        "CALL p(1)",
        "DO SLEEP(1)",
        "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
        "ANALYZE DELETE FROM t WHERE id = 1",
        "DESCRIBE SELECT 1",
        "CREATE TABLE t (a INT DEFAULT 1)",
        "BINLOG 'AAAA'",
        "SELECT t.do FROM t WHERE a = 1",  # a column named like one costs its shape
        # Quoted names holding quotes, quoted user variables.
        "SELECT `a'b` FROM t WHERE x = 1",
        'SELECT `a"b` FROM t',
        "SELECT @'x' FROM t",
        "SELECT @@'x'",
        "SET @`a'` = 1",
        # What the lexer rejects or the pattern does not read.
        "SELECT x'zz'",
        "SELECT b'2'",
        "SELECT 'open",
        "SELECT `open",
        "SELECT 1\x00",
        "SELECT 1\x01",
        "SELECT `a\x00b`",
        "SELECT 1 FROM t WHERE a = 'x'#",
        "SELECT 1abc FROM t",  # a name starting with a digit: wider than needed, but rare
    ],
)
def test_no_shape(sql: str) -> None:
    assert shape(sql) is None
    assert shape(sql, ansi_quotes=True) is None


def test_constant_sensitive_words_are_words_not_substrings() -> None:
    assert all(shape(f"{word.upper()} x") is None for word in CONSTANT_SENSITIVE)
    assert shape("SELECT calls, docs, created FROM t WHERE id = 1") is not None
    assert shape("SELECT `call` FROM t WHERE id = 1") is not None  # a quoted name


# Fragments to generate text from: SQL and literals of every form (CLEAN), and the forms
# that have no shape or sit at a boundary of the pattern (TRICKY), less often.
CLEAN = [
    *("SELECT", "FROM", "t", "sbtest1", "WHERE", "id", "=", "N", "n", "x", "X", "b", "B"),
    *("_utf8", "_binary", "_", "dox", "e5", "e", "$a", "é", "中", "1", "12", "1.5", ".5", "1."),
    *("1e5", "0x1F", "0b01", "'a'", "''", "'it''s'", '"x"', '"a""b"', "N'x'", "_utf8'x'"),
    *("X'ab'", "b'01'", "`a`", "`a``b`", "@v", "@@session.x", "@`x`", "@@`x`", "-", "/", "*"),
    *(".", ",", "(", ")", "?", "<=>", "->>", " ", "\n", "\t"),
]
TRICKY = [
    *("do", "DO", "Execute", "1abc", "1e", "1e+", "0x1g", "0b12", "0x", "'", '"', "x'zz'"),
    *("b'2'", "`", "`a'b`", '`a"b`', "@", "@@", "@'x'", '@"x"', "@`x'`", "--", "-- ", "#"),
    *("/*", "*/", "/*!", "/*!50000", "/*M!", ";", "\\", "\x00", "\x01"),
]
SOUPS = st.lists(
    st.tuples(st.sampled_from(CLEAN * 4 + TRICKY), st.sampled_from(["", " "])), max_size=24
).map(lambda parts: "".join(f + s for f, s in parts))


@settings(max_examples=600, deadline=None)
@given(SOUPS, st.booleans())
def test_a_shape_is_what_the_lexer_reads(sql: str, ansi: bool) -> None:
    """Where there is a shape, the lexer reads the text without error, as one statement, with
    no comment and no constant-sensitive word, and its literals are where the shape says."""
    form = shape(sql, ansi_quotes=ansi)
    if form is None:
        return
    for nbe in (False, True):
        tokens = tokenize(sql, **options(ansi, nbe))
        assert not any(t.kind == SEMI or t.executed_comment for t in tokens)
        assert not any(t.kind == WORD and t.keyword.lower() in CONSTANT_SENSITIVE for t in tokens)
        bounds = [0, *(p for t in tokens for p in (t.start, t.end)), len(sql)]
        gaps = [sql[start:end] for start, end in itertools.pairwise(bounds)][::2]
        assert all(not gap.strip(WHITESPACE) for gap in gaps)  # no comment anywhere
    assert form == lexer_shape(sql, ansi)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="SELCT dox'\"`@_N1.e-#/*!;\\\x00\n", max_size=30), st.booleans())
def test_a_shape_is_what_the_lexer_reads_in_any_text(sql: str, ansi: bool) -> None:
    form = shape(sql, ansi_quotes=ansi)
    if form is not None:
        assert form == lexer_shape(sql, ansi)


@settings(max_examples=400, deadline=None)
@given(SOUPS, st.booleans(), st.randoms(use_true_random=False))
def test_texts_of_one_shape_inspect_alike(sql: str, ansi: bool, rng: random.Random) -> None:
    form = shape(sql, ansi_quotes=ansi)
    if form is None:
        return
    other = vary(sql, ansi, rng)
    if shape(other, ansi_quotes=ansi) != form:
        return  # a literal that changed its neighbour's reading (`t.5` -> `t7`): no sharing
    for nbe in (False, True):
        # StatementInfo equality leaves out byte spans and prepared bodies only.
        assert read(sql, ansi, nbe) == read(other, ansi, nbe)


def test_a_lexer_error_has_no_shape() -> None:
    for sql in ("SELECT x'zz'", "SELECT 'open", "SELECT 1\x01"):
        with pytest.raises(LexError):
            tokenize(sql, **options())
        assert shape(sql) is None


# -- the MySQL/MariaDB grammar corpus -------------------------------------------------------

GRAMMARS = "mysql_grammars.jsonl"
# Measured when written: 841 of the 1,249 statements have a shape, 535 of them with at
# least one literal. A drop below this says the pattern refuses more than it used to.
MIN_SHAPED = 800


@pytest.mark.corpus
def test_corpus_shapes_decide_as_full_inspection(corpus_dir: Path) -> None:
    """Every corpus statement that has a shape inspects exactly like a copy of it with other
    literals (when the copy has the same shape), and its shape is the lexer's reading."""
    path = corpus_dir / GRAMMARS
    if not path.is_file():
        pytest.skip(f"{path} not found (the MySQL grammar corpus; set SLUICE_SHARED)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(12)
    shaped = with_literals = varied = 0
    for row in rows:
        sql = row["sql"]
        form = shape(sql)
        if form is None:
            continue
        shaped += 1
        assert form == lexer_shape(sql, False), sql
        if "\0" not in form:
            continue
        with_literals += 1
        other = vary(sql, False, rng)
        if shape(other) == form:
            varied += 1
            assert read(other) == read(sql), (sql, other)
    print(
        f"\nshapes: {shaped} of {len(rows)} corpus statements; {with_literals} with literals, "
        f"{varied} of those varied and compared"
    )
    assert shaped >= MIN_SHAPED
