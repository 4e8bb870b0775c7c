"""A PostgreSQL statement's shape from one pass over its characters, for the decision cache.

`policies.sql.postgres.shape` asks libpg_query to parse and normalise a text: about 3 µs,
most of a new text's cost when an app inlines its constants (`WHERE aid = 41`, `42`, ...).
`fast_shape` gives the common such statements a shape in a fraction of that: the text with
each integer replaced by `$i` and each string literal by `$s`, everything else kept as it
is, behind a NUL that no statement text holds (so a fast shape never equals a normalised
one, and the two kinds of cache entries never meet).

Texts with one fast shape inspect alike: they have the same characters outside their
literals and the same kind of literal at each place, so PostgreSQL's lexer gives them the
same tokens and its grammar the same tree, differing only in those literals' values, which
the inspection of a SELECT, INSERT, UPDATE or DELETE never reads (docs/decisions/0004).
Where that argument could fail there is no fast shape (None; the caller falls back to
libpg_query's), so the lexing below only has to be right for what it accepts:

- the first word must be SELECT, INSERT, UPDATE or DELETE, and no word may be one of the
  words whose statements read their constants as code or options (DO, EXPLAIN, CREATE,
  FUNCTION, PROCEDURE, EXECUTE, PREPARE, CALL, COPY: as `postgres.shape` refuses);
- none of `$` (parameters, dollar quotes), `\\`, `-` (comments; and a minus folds into the
  literal it precedes only where the grammar says so), `/` (comments), `&` (U&'...'), or a
  `;` before the end;
- integers only as whole tokens: not touching a letter, digit, `_`, `$`, `.` or a
  non-ASCII character on either side (so no 1.5, 1e3, 0x1F, 1_000: all refused);
- a string literal not preceded by a letter or digit (E'', B'', X'', N'' are refused) and not
  followed, across white space, by another one (which the lexer would join to it);
- double-quoted identifiers kept verbatim, and refused if unterminated or empty.

This module is pure Python and Cython compiles the same file (setup.py); the sidecar uses the
compiled build only (`sidecar.builds.pg_fast_shape`): in pure Python the loop costs about what
it saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

try:  # compiled by Cython (setup.py): the annotations below give C types; else inert
    import cython

    COMPILED: bool = cython.compiled
except ModuleNotFoundError:  # Cython is a build dependency: without it, its decorators are inert
    COMPILED = False

    class cython:  # type: ignore[no-redef]
        """The decorators this module takes from Cython's pure-Python mode, as no-ops."""

        @staticmethod
        def cfunc(function: _F) -> _F:
            return function


MARK = "\0"  # starts every fast shape; never in a PostgreSQL statement text
COMPILED_MODULE = "policies.sql._pg_fastshape_c"  # this file's Cython build (setup.py)
_FIRST_WORDS = ("select", "insert", "update", "delete")
# As policies.sql.postgres._CONSTANT_SENSITIVE: statements that read constants as code.
_SENSITIVE = (
    "do",
    "explain",
    "create",
    "function",
    "procedure",
    "execute",
    "prepare",
    "call",
    "copy",
)
_REFUSED = frozenset("$\\-/&")


@cython.cfunc  # compiled: a C loop, called without Python's call protocol
def _is_word(sql: str, start: cython.Py_ssize_t, end: cython.Py_ssize_t, word: str) -> cython.bint:
    """Whether `sql[start:end]` is `word` (lower-case ASCII letters) in any ASCII case, as
    PostgreSQL's keyword lookup folds case (ASCII only: a word with any other character is
    never a keyword). Compares in place: no slice, no lower-cased copy, no hash."""
    k: cython.Py_ssize_t
    if end - start != len(word):
        return False
    for k in range(end - start):  # noqa: SIM110 (compiled: a C loop; all() would be a generator)
        # OR 0x20 folds A-Z onto a-z and maps nothing else onto a lower-case letter.
        if (ord(sql[start + k]) | 0x20) != ord(word[k]):
            return False
    return True


@cython.cfunc
def _is_any(
    sql: str, start: cython.Py_ssize_t, end: cython.Py_ssize_t, words: tuple[str, ...]
) -> cython.bint:
    """Whether `sql[start:end]` is one of `words` (`_is_word`)."""
    word: str
    for word in words:  # noqa: SIM110 (compiled: a C loop; any() would be a generator)
        if _is_word(sql, start, end, word):
            return True
    return False


def fast_shape(sql: str) -> str | None:
    """The text's fast shape (see the module docstring), or None when it has none."""
    n: cython.Py_ssize_t = len(sql)
    i: cython.Py_ssize_t = 0
    start: cython.Py_ssize_t
    done: cython.Py_ssize_t = 0  # sql[done:i] is still to be copied into the shape
    j: cython.Py_ssize_t
    ch: cython.Py_UCS4
    first = True
    parts: list[str] = [MARK]
    while i < n:
        ch = sql[i]
        if ch == " " or ch == "\n" or ch == "\t" or ch == "\r":
            i += 1
        elif ch < " ":
            return None  # \f, \v, NUL...: white space only to some versions' lexers
        elif ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ch == "_" or ch >= "\x80":
            start = i
            i += 1
            while i < n:
                ch = sql[i]
                if (
                    ("a" <= ch <= "z")
                    or ("A" <= ch <= "Z")
                    or ("0" <= ch <= "9")
                    or ch == "_"
                    or ch >= "\x80"
                ):
                    i += 1
                else:
                    break
            if i < n and (sql[i] == "'" or sql[i] == "$"):
                return None  # E'...', B'...', X'...', N'...'; $ in an identifier
            if first:
                if not _is_any(sql, start, i, _FIRST_WORDS):
                    return None
                first = False
            elif i - start <= 9 and _is_any(sql, start, i, _SENSITIVE):  # 9: "procedure"
                return None
        elif first:
            return None  # not a word first: not a plain SELECT, INSERT, UPDATE or DELETE
        elif "0" <= ch <= "9":
            if i > 0 and sql[i - 1] == ".":
                return None
            start = i
            i += 1
            while i < n and "0" <= sql[i] <= "9":
                i += 1
            if i < n:
                ch = sql[i]
                if (
                    ("a" <= ch <= "z")
                    or ("A" <= ch <= "Z")
                    or ch == "_"
                    or ch == "."
                    or ch == "$"
                    or ch >= "\x80"
                ):
                    return None
            parts.append(sql[done:start])
            parts.append("$i")
            done = i
        elif ch == "'":
            start = i
            i += 1
            while True:
                if i >= n:
                    return None  # unterminated
                if sql[i] == "'":
                    if i + 1 < n and sql[i + 1] == "'":
                        i += 2
                        continue
                    i += 1
                    break
                if sql[i] == "\\":
                    return None
                i += 1
            parts.append(sql[done:start])
            parts.append("$s")
            done = i
            j = i
            while j < n and (sql[j] == " " or sql[j] == "\n" or sql[j] == "\t" or sql[j] == "\r"):
                j += 1
            if j < n and sql[j] == "'":
                return None  # a continuation the lexer would join to this literal
        elif ch == '"':
            start = i
            i += 1
            while True:
                if i >= n:
                    return None
                if sql[i] == '"':
                    if i + 1 < n and sql[i + 1] == '"':
                        i += 2
                        continue
                    i += 1
                    break
                i += 1
            if i - start == 2:
                return None  # "": the lexer refuses a zero-length identifier
        elif ch == ";":
            i += 1
            while i < n:
                ch = sql[i]
                if not (ch == " " or ch == "\n" or ch == "\t" or ch == "\r"):
                    return None  # a second statement
                i += 1
        elif ch in _REFUSED:
            return None
        else:
            i += 1
    if first:
        return None
    parts.append(sql[done:])
    return "".join(parts)
