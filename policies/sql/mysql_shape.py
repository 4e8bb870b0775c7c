"""Statement shapes for MySQL/MariaDB: texts that differ only in literal constants share one.

`shape(sql)` is the text with every string, number, hex and bit literal (`'...'`, `"..."`
unless ANSI_QUOTES, `N'...'`, `_charset'...'`, `X'..'`, `0x..`, `b'..'`, `0b..`) replaced
by a placeholder naming its kind; everything else stays as written. `SqlDecider` keys a
second decision cache on it, so an app that inlines its constants (PyMySQL, sysbench
without prepared statements, most PHP) pays one inspection per shape, not one per text
(docs/decisions/0012).

Why sharing is safe: the MySQL inspector reads token kinds, keywords and names, never a
literal's value, except where a string is SQL (`PREPARE ... FROM '...'`, `EXECUTE
IMMEDIATE '...'`). Two texts with one shape have the same tokens, literal values apart, so
they inspect alike (byte spans and parse error messages apart: the decider shares neither
multi-statement results nor errors). The shape is None, and the text is inspected in full,
wherever that argument could fail:

- a keyword of `CONSTANT_SENSITIVE` (PostgreSQL's list and MySQL's own), as a word outside
  literals;
- any comment: `/*! ... */`, `/*!NNNNN ... */` and `/*M! ... */` hold SQL the server runs
  or not by its version, plain ones can split keywords, `#` and `-- ` hide the rest of a
  line (a `--` the server reads as two minus signs is refused too);
- any backslash: in a string it is an escape or not by NO_BACKSLASH_ESCAPES;
- a `;` outside a literal: several statements, whose results carry byte spans;
- quoted names or user variables holding a quote or a NUL (`` `a'b` ``, `@'x'`);
- anything the lexer would reject or that the pattern does not read as one of its tokens;
  a word starting with a digit (`1abc`) too, which is legal but rare.

The pattern follows `mysql_lexer`'s alternatives in the lexer's order, built from the same
pieces, and keeps no token where the lexer would read a literal or a comment first.
tests/policies/sql/test_mysql_shape.py compares it with the lexer on generated text and
on the grammar corpus.
"""

from __future__ import annotations

import re
from functools import cache

from policies.sql.mysql_lexer import (
    BIT,
    BIT_PATTERN,
    HEX,
    HEX_PATTERN,
    ID_CHARS,
    NUMBER,
    NUMBER_PATTERN,
    OP_PATTERN,
    STRING,
    WHITESPACE,
    WORD_PATTERN,
    string_pattern,
)

# Keywords of statements whose inspection reads a constant's value or which another
# statement's constant could hide: PostgreSQL's list (docs/decisions/0004) for the same
# reasons where they apply (EXPLAIN/ANALYZE/DESCRIBE run or explain a statement; CREATE,
# FUNCTION and PROCEDURE define code; CALL and EXECUTE are opaque), PREPARE and EXECUTE
# IMMEDIATE inspect their string as SQL, and BINLOG's string is row events the server
# applies. Matched as whole words outside literals: as a column name it costs a shape.
CONSTANT_SENSITIVE = (
    "do",
    "explain",
    "describe",
    "analyze",
    "create",
    "function",
    "procedure",
    "execute",
    "prepare",
    "call",
    "copy",
    "binlog",
)

# One placeholder per literal kind. A NUL cannot occur outside a literal in a text that has
# a shape (the pattern reads none there), so a shape maps back to exactly one sequence of
# non-literal text and literal kinds: two texts share a shape only if they differ in
# nothing but the values of their literals.
PLACEHOLDERS = {STRING: "\x00s", NUMBER: "\x00n", HEX: "\x00x", BIT: "\x00b"}

# Quoted names, as the lexer reads them but refused when they hold a quote or a NUL: the
# pattern then matches nothing there, and the shape is None.
_BACKTICK = r"`(?:[^`'\"\x00]++|``)*+`"
_ANSI_IDENT = r"\"(?:[^\"'\x00]++|\"\")*+\""


@cache
def _pattern(ansi_quotes: bool) -> re.Pattern[str]:
    """A run of tokens that are kept, then one literal (its kind as the group name) or the
    end of the text. No backslash reaches here, so backslash escapes make no difference."""
    strings = string_pattern(ansi_quotes, backslash=False)
    quoted_idents = _BACKTICK + (f"|{_ANSI_IDENT}" if ansi_quotes else "")
    sensitive = _keyword_pattern(CONSTANT_SENSITIVE)
    kept = "|".join(
        (
            f"[{WHITESPACE}]+",
            quoted_idents,
            rf"@@(?:[{ID_CHARS}.]++|{_BACKTICK})*+(?![`'\"])",  # system variable
            rf"@(?!@)(?:[{ID_CHARS}.]++|{_BACKTICK}|(?![`'\"]))",  # user variable, unquoted name
            # The lexer tries literals (and malformed hex or bit literals) before words and
            # comments before operators: no word or operator may start where one could.
            # These stops are wider than the lexer's alternatives (`1abc` is a word), which
            # only costs a shape.
            rf"(?![0-9]|[nNxXbB]'|_[A-Za-z0-9_]+['\"]|{sensitive}){WORD_PATTERN}",
            r"\?",
            rf"(?!\.[0-9]|/\*|\*/|--)(?:{OP_PATTERN})",
        )
    )
    literal = "|".join(
        f"(?P<{kind}>{pattern})"
        for kind, pattern in (
            (STRING, strings),
            (HEX, HEX_PATTERN),
            (BIT, BIT_PATTERN),
            (NUMBER, NUMBER_PATTERN),
        )
    )
    return re.compile(rf"(?:{kept})*+(?:{literal}|(?P<end>\Z))")


def _keyword_pattern(words: tuple[str, ...]) -> str:
    """Any of `words` as a whole word, case-insensitively: `(?=[dD...])(?i:d(?:o|escribe)|...)`
    (a word not starting with one of their letters costs one character test)."""
    rests: dict[str, list[str]] = {}
    for word in words:
        rests.setdefault(word[0], []).append(word[1:])
    initials = "".join(rests) + "".join(rests).upper()
    branches = "|".join(f"{first}(?:{'|'.join(tails)})" for first, tails in rests.items())
    return rf"(?=[{initials}])(?i:{branches})(?![{ID_CHARS}])"


def shape(sql: str, *, ansi_quotes: bool = False) -> str | None:
    """`sql` with each literal replaced by its kind's placeholder, when inspecting it cannot
    depend on the literals' values and the text has none of the forms listed above; None
    otherwise. For the session's ANSI_QUOTES setting; the same for any server version
    and either NO_BACKSLASH_ESCAPES setting (a text with a backslash has no shape)."""
    if "\\" in sql:
        return None
    match = _pattern(ansi_quotes).match
    out: list[str] = []
    pos = 0
    while True:
        m = match(sql, pos)
        if m is None:
            return None
        kind = m.lastgroup  # a literal's kind, or "end"
        if kind is None:
            return None
        if kind == "end":
            out.append(sql[pos:])
            return "".join(out)
        out.append(sql[pos : m.start(kind)])
        out.append(PLACEHOLDERS[kind])
        pos = m.end()
