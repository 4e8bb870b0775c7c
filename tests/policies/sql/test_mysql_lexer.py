"""The MySQL/MariaDB lexer reads comments, quotes and version comments as the server does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.sql.mysql_lexer import (
    BIT,
    HEX,
    NUMBER,
    OP,
    PARAM,
    QUOTED_IDENT,
    SEMI,
    STRING,
    SYSVAR,
    VARIABLE,
    WORD,
    LexError,
    mask_literals,
    tokenize,
)

MARIADB = {
    "server_version": 101100,
    "mariadb": True,
    "ansi_quotes": False,
    "no_backslash_escapes": False,
}
MYSQL = {**MARIADB, "server_version": 80036, "mariadb": False}


def texts(sql: str, **options: object) -> list[str]:
    return [t.text for t in tokenize(sql, **{**MARIADB, **options})]


def kinds(sql: str, **options: object) -> list[str]:
    return [t.kind for t in tokenize(sql, **{**MARIADB, **options})]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1 /* plain */ + 2", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*! + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*!50000 + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*!99999 + 2 */", ["SELECT", "1"]),
        ("SELECT 1 /*!101100 + 2 */", ["SELECT", "1", "+", "2"]),  # 6 digits: 10.11.0
        ("SELECT 1 /*!101101 + 2 */", ["SELECT", "1"]),
        ("SELECT 1 /*!100000+2*/", ["SELECT", "1", "+", "2"]),
        # MariaDB skips MySQL-only versions 50700-99999 under /*! but not under /*M!
        ("SELECT 1 /*!50700 + 2 */", ["SELECT", "1"]),
        ("SELECT 1 /*!50699 + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*M!50700 + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*M! + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*M!100000 + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*M!999999 + 2 */", ["SELECT", "1"]),
        # a plain comment inside a read one is skipped, and the read one goes on
        ("SELECT 1 /*! + 2 /* x */ + 3 */", ["SELECT", "1", "+", "2", "+", "3"]),
        # a skipped version comment may hold one nested comment
        ("SELECT 1 /*!99999 a /* b */ c */ + 2", ["SELECT", "1", "+", "2"]),
        # the first */ ends a read comment, even one opened twice
        ("SELECT 1 /*! + 2 /*! + 3 */ * 4", ["SELECT", "1", "+", "2", "+", "3", "*", "4"]),
        # outside a read comment, */ is two operators
        ("SELECT 2 */ 1", ["SELECT", "2", "*", "/", "1"]),
        ("SELECT 1 /*/ x */", ["SELECT", "1"]),
        ("SELECT 1 /*!1234 x */", ["SELECT", "1", "1234", "x"]),  # no version: read
    ],
)
def test_comments_on_mariadb(sql: str, expected: list[str]) -> None:
    assert texts(sql) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1 /*!50700 + 2 */", ["SELECT", "1", "+", "2"]),  # MySQL reads its own versions
        ("SELECT 1 /*!80036 + 2 */", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 /*!80037 + 2 */", ["SELECT", "1"]),
        ("SELECT 1 /*M! + 2 */", ["SELECT", "1"]),  # a plain comment to MySQL
        ("SELECT 1 /*M!50000 + 2 */", ["SELECT", "1"]),
        # MySQL reads five digits: the sixth is SQL
        ("SELECT 1 /*!100000 + 2 */", ["SELECT", "1", "0", "+", "2"]),
    ],
)
def test_comments_on_mysql(sql: str, expected: list[str]) -> None:
    assert texts(sql, **MYSQL) == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1 -- comment", ["SELECT", "1"]),
        ("SELECT 1 --\tcomment", ["SELECT", "1"]),
        ("SELECT 1 --\ncomment", ["SELECT", "1", "comment"]),
        ("SELECT 1 --", ["SELECT", "1"]),
        ("SELECT 1 --1", ["SELECT", "1", "-", "-", "1"]),
        ("SELECT 1 --x", ["SELECT", "1", "-", "-", "x"]),
        ("SELECT 1 # comment\n+ 2", ["SELECT", "1", "+", "2"]),
        ("SELECT 1 #", ["SELECT", "1"]),
        ("SELECT 1 /*! -- */\n */", ["SELECT", "1"]),  # a line comment hides the */
    ],
)
def test_line_comments(sql: str, expected: list[str]) -> None:
    assert texts(sql) == expected


@pytest.mark.parametrize(
    ("sql", "options", "expected"),
    [
        (r"SELECT 'a\'b', 'c'", {}, [r"'a\'b'", "'c'"]),
        ("SELECT 'it''s'", {}, ["'it''s'"]),
        (r"SELECT 'a\\', 'b'", {}, [r"'a\\'", "'b'"]),
        (r"SELECT 'a\', 'b'", {"no_backslash_escapes": True}, [r"'a\'", "'b'"]),
        ('SELECT "a\\"b"', {}, ['"a\\"b"']),
        ("SELECT _utf8mb4'x', N'y', n'z'", {}, ["_utf8mb4'x'", "N'y'", "n'z'"]),
    ],
)
def test_strings(sql: str, options: dict[str, bool], expected: list[str]) -> None:
    tokens = tokenize(sql, **{**MARIADB, **options})
    assert [t.text for t in tokens if t.kind == STRING] == expected


def test_ansi_quotes_make_double_quotes_identifiers() -> None:
    assert kinds('SELECT "a" FROM t') == [WORD, STRING, WORD, WORD]
    assert kinds('SELECT "a" FROM t', ansi_quotes=True) == [WORD, QUOTED_IDENT, WORD, WORD]
    assert texts('SELECT "a""b\\"', ansi_quotes=True) == ["SELECT", '"a""b\\"']


def test_token_kinds() -> None:
    sql = "SELECT `a``b`, X'0F', 0x1f, b'01', 0b1, 1.5e3, .5, @v, @'q v', @@global.x, ?; <=> 1abc"
    tokens = tokenize(sql, **MARIADB)
    assert [(t.kind, t.text) for t in tokens if t.text != ","] == [
        (WORD, "SELECT"),
        (QUOTED_IDENT, "`a``b`"),
        (HEX, "X'0F'"),
        (HEX, "0x1f"),
        (BIT, "b'01'"),
        (BIT, "0b1"),
        (NUMBER, "1.5e3"),
        (NUMBER, ".5"),
        (VARIABLE, "@v"),
        (VARIABLE, "@'q v'"),
        (SYSVAR, "@@global.x"),
        (PARAM, "?"),
        (SEMI, ";"),
        (OP, "<=>"),
        (WORD, "1abc"),
    ]
    assert tokens[0].keyword == "SELECT" and tokens[1].keyword == ""
    assert (tokens[0].start, tokens[0].end) == (0, 6)


def test_executed_comment_tokens_are_marked() -> None:
    tokens = tokenize("SELECT /*! 1 */ ;", **MARIADB)
    assert [t.executed_comment for t in tokens] == [False, True, False]


@pytest.mark.parametrize(
    ("sql", "position"),
    [
        ("SELECT 'abc", 7),
        ('SELECT "abc', 7),
        ("SELECT `abc", 7),
        (r"SELECT 'abc\'", 7),
        ("SELECT 1 /* abc", 9),
        ("SELECT 1 /*!99999 abc", 9),
        ("SELECT 1 /*!99999 /* inner */ abc", 9),
        ("SELECT 1 /*! + 2", 16),
        ("SELECT X'0G'", 7),
        ("SELECT b'12'", 7),
        ("SELECT 1 \x00", 9),
        ("SELECT 1 # x\x00 + 1", 12),
        ("SELECT \x01", 7),
    ],
)
def test_lex_errors_carry_the_position(sql: str, position: int) -> None:
    with pytest.raises(LexError) as caught:
        tokenize(sql, **MARIADB)
    assert caught.value.position == position
    assert isinstance(caught.value, ValueError)


def test_unterminated_quote_does_not_backtrack() -> None:
    with pytest.raises(LexError):
        tokenize("SELECT '" + "a\\'" * 20_000, **MARIADB)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT * FROM t WHERE card = '4111' AND n = 42",
            "SELECT * FROM t WHERE card = ? AND n = ?",
        ),
        ("SELECT X'ff', 0xff, b'1', 1.5, -3", "SELECT ?, ?, ?, ?, -?"),
        ("SELECT _latin1'secret', N'x'", "SELECT ?, ?"),
        (r"SELECT 'a\' OR 1 -- ', 2", "SELECT ?, ?"),
        ("SELECT 1 /* keep 2 */ -- keep 3", "SELECT ? /* keep 2 */ -- keep 3"),
        ("SELECT /*!50000 'x' */ /*!99999 'y' */", "SELECT /*!50000 ? */ /*!99999 'y' */"),
        ("SELECT `col1`, @v FROM t1", "SELECT `col1`, @v FROM t1"),
        ("SELECT 'é', 'ü'", "SELECT ?, ?"),
    ],
)
def test_mask_literals(sql: str, expected: str) -> None:
    assert mask_literals(sql, **MARIADB) == expected


def test_mask_with_ansi_quotes_keeps_identifiers() -> None:
    masked = mask_literals(
        "SELECT \"col\" FROM t WHERE a = 'x'", **{**MARIADB, "ansi_quotes": True}
    )
    assert masked == 'SELECT "col" FROM t WHERE a = ?'


@given(st.text())
def test_tokenize_raises_only_lex_errors(sql: str) -> None:
    try:
        tokens = tokenize(sql, **MARIADB)
    except LexError:
        return
    assert all(0 <= t.start < t.end <= len(sql) for t in tokens)
    assert all(sql[t.start : t.end] == t.text for t in tokens)
