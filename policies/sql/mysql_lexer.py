"""The MySQL/MariaDB lexer: SQL text in, the tokens the server would read out.

Comments decide what runs in MySQL: `/*! ... */` and `/*!NNNNN ... */` hide SQL from
everything but a server new enough, so the lexer follows the server's own scanner
(`sql_lex.cc`) rather than a generic SQL tokeniser:

- `/*!` without a version is always read; `/*!NNNNN` (MariaDB: 5 or 6 digits) is read when
  the server version is at least NNNNN. MariaDB also skips MySQL-only versions 50700-99999
  under `/*!` but not under its own `/*M!`, which MySQL treats as a plain comment.
- Inside a read comment, the first `*/` ends it; a plain comment nested in it is skipped
  and the read comment goes on. A skipped version comment may hold one nested comment.
- `-- ` starts a comment only when a space or control character (or the end) follows;
  `#` comments and `-- ` comments end at a newline or a NUL character.

Text the server would reject lexically (an unterminated quote or comment, a NUL or control
character outside a literal, a malformed hex or bit literal) raises `LexError`.
"""

from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple

# Token kinds.
WORD = "word"  # identifier or keyword
QUOTED_IDENT = "quoted_ident"  # `name`, or "name" under ANSI_QUOTES
STRING = "string"  # '...', "...", N'...', _charset'...'
NUMBER = "number"
HEX = "hex"  # X'..', 0x..
BIT = "bit"  # B'..', 0b..
VARIABLE = "variable"  # @name, @'name'
SYSVAR = "sysvar"  # @@name, @@global.name
PARAM = "param"  # ?
SEMI = "semi"  # ;
OP = "op"  # operators and punctuation

LITERALS: frozenset[str] = frozenset({STRING, NUMBER, HEX, BIT})

# The server compares /*!NNNNN against its own version; MariaDB ignores this MySQL-only
# range under /*! (MySQL 5.7+ syntax it may not share) but honours it under /*M!.
_MARIADB_SKIPPED_MYSQL_VERSIONS = range(50700, 100000)
_VERSION_5 = re.compile(r"[0-9]{5}")
_VERSION_5_OR_6 = re.compile(r"[0-9]{5,6}")

WHITESPACE = " \t\n\v\f\r"  # what the server skips between tokens
ID_CHARS = "A-Za-z0-9_$\u0080-\U0010ffff"  # identifier characters (any non-ASCII character too)


class LexError(ValueError):
    """Text the server's lexer rejects; `position` is the character offset of the problem."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at offset {position}")
        self.position = position


class Token(NamedTuple):
    """One token. A NamedTuple rather than a dataclass: the lexer makes many, and fast.

    keyword:  the upper-cased text for WORD tokens, "" for every other kind.
    executed_comment: the token was read from inside a `/*! ... */` comment.
    """

    kind: str
    text: str
    start: int
    end: int
    keyword: str = ""
    executed_comment: bool = False


def quoted(quote: str, backslash: bool) -> str:
    """A quoted run with doubled-quote escapes (and backslash escapes when enabled).
    Possessive quantifiers keep an unterminated quote from backtracking."""
    if backslash:
        return rf"{quote}(?:[^{quote}\\]++|\\[\s\S]|{quote}{quote})*+{quote}"
    return rf"{quote}(?:[^{quote}]++|{quote}{quote})*+{quote}"


def string_pattern(ansi_quotes: bool, backslash: bool) -> str:
    """String literals: '...' (N'...', _charset'...'), and "..." unless ANSI_QUOTES."""
    single = quoted("'", backslash)
    strings = rf"(?:_[A-Za-z0-9_]+|[nN])?{single}"
    if not ansi_quotes:
        double = quoted('"', backslash)
        strings += rf"|(?:_[A-Za-z0-9_]+)?{double}"
    return strings


# Token patterns shared with `mysql_shape`, so that both read a text alike.
HEX_PATTERN = rf"[xX]'[0-9a-fA-F]*'|0x[0-9a-fA-F]+(?![{ID_CHARS}])"
BIT_PATTERN = rf"[bB]'[01]*'|0b[01]+(?![{ID_CHARS}])"
BAD_LITERAL_PATTERN = r"[xXbB]'"
NUMBER_PATTERN = rf"(?>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?(?![{ID_CHARS}])"
WORD_PATTERN = rf"[{ID_CHARS}]++"
OP_PATTERN = r"<=>|<<|>>|<=|>=|<>|!=|:=|\|\||&&|->>|->|[-+*/%^&|~!<>=:,.()\[\]{}\\]"


@cache
def _pattern(ansi_quotes: bool, backslash: bool) -> re.Pattern[str]:
    single = quoted("'", backslash)
    double = quoted('"', backslash)
    backtick = quoted("`", False)
    quoted_idents = backtick
    if ansi_quotes:
        quoted_idents += "|" + quoted('"', False)
    parts = [
        rf"(?P<ws>[{WHITESPACE}]+)",
        r"(?P<comment_open>/\*)",
        r"(?P<line_comment>\#[^\n\x00]*|--(?=[\x00-\x20\x7f]|\Z)[^\n\x00]*)",
        r"(?P<comment_close>\*/)",
        rf"(?P<{STRING}>{string_pattern(ansi_quotes, backslash)})",
        rf"(?P<{HEX}>{HEX_PATTERN})",
        rf"(?P<{BIT}>{BIT_PATTERN})",
        rf"(?P<bad_literal>{BAD_LITERAL_PATTERN})",
        rf"(?P<{NUMBER}>{NUMBER_PATTERN})",
        rf"(?P<{QUOTED_IDENT}>{quoted_idents})",
        rf"(?P<{SYSVAR}>@@(?:[{ID_CHARS}.]++|{backtick})*+)",
        rf"(?P<{VARIABLE}>@(?:[{ID_CHARS}.]++|{single}|{double}|{backtick})?)",
        rf"(?P<{WORD}>{WORD_PATTERN})",
        rf"(?P<{PARAM}>\?)",
        rf"(?P<{SEMI}>;)",
        rf"(?P<{OP}>{OP_PATTERN})",
        r"(?P<bad>[\s\S])",
    ]
    return re.compile("|".join(parts))


def tokenize(
    sql: str,
    *,
    server_version: int,
    mariadb: bool,
    ansi_quotes: bool,
    no_backslash_escapes: bool,
) -> list[Token]:
    """The tokens the server reads from `sql`: comments and skipped version comments dropped."""
    match = _pattern(ansi_quotes, not no_backslash_escapes).match
    tokens: list[Token] = []
    append = tokens.append
    pos = 0
    length = len(sql)
    executed = False  # inside /*! ... */
    while pos < length:
        m = match(sql, pos)
        assert m is not None  # the last alternative matches any character
        kind = m.lastgroup
        end = m.end()
        if kind == "ws" or kind == "line_comment":
            pos = end
            continue
        if kind == "comment_open":
            pos, executed = _block_comment(sql, pos, executed, server_version, mariadb)
            continue
        if kind == "comment_close":
            if executed:
                executed = False
                pos = end
                continue
            kind, end = OP, pos + 1  # a lone `*`; the `/` is read next
        elif kind == "bad" or kind == "bad_literal":
            raise LexError(_bad_message(sql, pos), pos)
        text = sql[pos:end]
        append(Token(kind or "", text, pos, end, text.upper() if kind == WORD else "", executed))
        pos = end
    if executed:
        raise LexError("unterminated executable comment", length)
    return tokens


def _block_comment(
    sql: str, pos: int, executed: bool, server_version: int, mariadb: bool
) -> tuple[int, bool]:
    """Read the comment opened at `pos`: (where lexing resumes, inside a read comment?)."""
    body = pos + 2
    mariadb_marker = mariadb and sql.startswith("M!", body)
    if not mariadb_marker and not sql.startswith("!", body):
        return _comment_end(sql, body, 0, pos), executed
    body += 2 if mariadb_marker else 1
    version = (_VERSION_5_OR_6 if mariadb else _VERSION_5).match(sql, body)
    if version is None:
        return body, True
    number = int(version.group())
    runs = number <= server_version and (
        mariadb_marker or not mariadb or number not in _MARIADB_SKIPPED_MYSQL_VERSIONS
    )
    if runs:
        return version.end(), True
    return _comment_end(sql, body, 1, pos), executed


def _comment_end(sql: str, pos: int, nesting: int, opened_at: int) -> int:
    """The offset after the `*/` closing a skipped comment; `nesting` comments may nest."""
    end = _find_close(sql, pos, nesting)
    if end < 0:
        raise LexError("unterminated comment", opened_at)
    return end


def _find_close(sql: str, pos: int, nesting: int) -> int:
    while True:
        close = sql.find("*/", pos)
        if close < 0:
            return -1
        # `close + 1`: an opener overlapping the closer (`/*/`) is read first, as the server does.
        inner = sql.find("/*", pos, close + 1) if nesting else -1
        if inner < 0:
            return close + 2
        pos = _find_close(sql, inner + 2, nesting - 1)
        if pos < 0:
            return -1


def _bad_message(sql: str, pos: int) -> str:
    char = sql[pos]
    if char in "'\"`":
        return f"unterminated {char} quote"
    if char in "xXbB":
        return "malformed hex or bit literal"
    return f"character {char!r} outside a literal"


def mask_literals(
    sql: str,
    *,
    server_version: int,
    mariadb: bool,
    ansi_quotes: bool,
    no_backslash_escapes: bool,
) -> str:
    """`sql` with every string, number, hex and bit literal replaced by `?`; comments and
    identifiers are kept as written. Raises `LexError` where `tokenize` does."""
    tokens = tokenize(
        sql,
        server_version=server_version,
        mariadb=mariadb,
        ansi_quotes=ansi_quotes,
        no_backslash_escapes=no_backslash_escapes,
    )
    out: list[str] = []
    pos = 0
    for token in tokens:
        if token.kind in LITERALS:
            out.append(sql[pos : token.start])
            out.append("?")
            pos = token.end
    out.append(sql[pos:])
    return "".join(out)
