"""The structure of a MySQL/MariaDB token stream: where statements end, and what they name.

Statements end at a `;`, as the server's multi-statement loop splits them, except inside a
compound statement (a stored program's `BEGIN ... END` body, MariaDB's `BEGIN NOT ATOMIC`,
`IF`, `LOOP` ...), which the server parses whole; `_Blocks` follows those. Where it cannot
follow one it ends the statement early: the pieces then name more verbs, never fewer. The
table names a statement mentions are read here too, best effort except for write targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policies.sql.mysql_lexer import NUMBER, QUOTED_IDENT, SEMI, VARIABLE, WHITESPACE, WORD, Token

Tokens = Sequence[Token]

# Keywords that open a block when a statement starts with them inside a compound statement.
_OPENERS = frozenset({"IF", "CASE", "LOOP", "WHILE", "REPEAT", "FOR"})
# Words between a routine's parameter list and its body (characteristics; RETURNS type).
_CHARACTERISTICS = frozenset(
    {"LANGUAGE", "SQL", "NOT", "DETERMINISTIC", "CONTAINS", "NO", "READS", "MODIFIES", "DATA"}
    | {"SECURITY", "DEFINER", "INVOKER"}
)
_TYPE_WORDS = frozenset(
    {"UNSIGNED", "SIGNED", "ZEROFILL", "BINARY", "ASCII", "UNICODE", "BYTE", "PRECISION"}
    | {"VARYING", "CHAR", "VARCHAR"}
)
ROUTINES = frozenset({"PROCEDURE", "FUNCTION", "TRIGGER", "EVENT"})
_CREATE_PREFIX = frozenset(
    {"OR", "REPLACE", "AGGREGATE", "TEMPORARY", "UNIQUE", "FULLTEXT", "SPATIAL", "ONLINE"}
)
# Reserved words, which cannot be an unquoted table name or alias.
_RESERVED = frozenset(
    {"SELECT", "WHERE", "SET", "VALUES", "VALUE", "ON", "USING", "JOIN", "LEFT", "RIGHT"}
    | {"INNER", "OUTER", "CROSS", "NATURAL", "STRAIGHT_JOIN", "ORDER", "GROUP", "HAVING"}
    | {"LIMIT", "WINDOW", "UNION", "EXCEPT", "INTERSECT", "FOR", "LOCK", "INTO", "PARTITION"}
    | {"AS", "DUAL", "TABLE", "IF", "LATERAL", "WITH", "FROM", "TO", "LIKE", "READ", "WRITE"}
    | {"LOW_PRIORITY", "IGNORE", "DELAYED", "HIGH_PRIORITY", "USE", "FORCE", "KEY", "INDEX"}
    | {"DEFAULT", "ALL", "DISTINCT", "EXISTS", "NOT", "OUTFILE", "DUMPFILE", "RETURNING"}
    | {"CASCADE", "RESTRICT", "AND", "OR", "BY", "IN", "IS", "NULL", "CHARACTER", "LINES"}
)
_MODIFIERS = frozenset({"LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "IGNORE", "QUICK"})
_LOCK_MODES = frozenset({"READ", "WRITE", "LOCAL", "LOW_PRIORITY"})
_NAME_LISTS = frozenset(
    {"FROM", "JOIN", "STRAIGHT_JOIN", "INTO", "TABLE", "TABLES", "USING", "REFERENCES", "VIEW"}
)
_FIRST_ONLY_NAMES = frozenset({"DESCRIBE", "DESC", "EXPLAIN", "HANDLER", "TRUNCATE"})
_NOT_A_TARGET_AFTER = frozenset({"ON", "KEY", "FOR", "BEFORE", "AFTER"})
_RENAMED_PARTS = frozenset({"COLUMN", "INDEX", "KEY", "USER", "CONSTRAINT"})
_SUBQUERY_STARTS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})


@dataclass(frozen=True, slots=True)
class Piece:
    """One statement: its tokens, its text's character offsets, and a splitting error."""

    tokens: Tokens
    start: int
    end: int
    error: str | None


def pieces(sql: str, tokens: Tokens) -> list[Piece]:
    """The statements of `sql`, split as the server splits a multi-statement query."""
    out = []
    text_start = 0
    i = 0
    count = len(tokens)
    while i < count:
        if tokens[i].kind == SEMI:
            text_start = tokens[i].end
            i += 1
            continue
        end, error = _statement_end(tokens, i)
        text_end = tokens[end].start if end < count else len(sql)
        if error is None and end < count and tokens[end].executed_comment:
            # The server starts a fresh lexer after the `;`, outside the comment: its `*/`
            # then is a syntax error.
            error = "a ';' inside an executable comment ends the statement"
        text = sql[text_start:text_end]
        start = text_start + len(text) - len(text.lstrip(WHITESPACE))
        out.append(Piece(tokens[i:end], start, text_start + len(text.rstrip(WHITESPACE)), error))
        text_start = tokens[end].end if end < count else len(sql)
        i = end + 1
    return out


def _statement_end(tokens: Tokens, i: int) -> tuple[int, str | None]:
    """The index of the `;` ending the statement that starts at `i` (or the token count)."""
    body = i if opens_block(tokens, i, top=True) else routine_body(tokens, i)
    if body >= 0 and opens_block(tokens, body, top=False):
        return _Blocks(tokens).end(body)
    return _next_semi(tokens, i), None


def _next_semi(tokens: Tokens, i: int) -> int:
    for k in range(i, len(tokens)):
        if tokens[k].kind == SEMI:
            return k
    return len(tokens)


def keyword_at(tokens: Tokens, i: int) -> str:
    """The keyword of the token at `i`; "" past the end or for a token that is no word."""
    return tokens[i].keyword if i < len(tokens) else ""


def _is_label(tokens: Tokens, i: int) -> bool:
    return (
        i + 1 < len(tokens) and tokens[i].kind in (WORD, QUOTED_IDENT) and tokens[i + 1].text == ":"
    )


def opens_block(tokens: Tokens, i: int, *, top: bool) -> bool:
    """Does a block start at `i`? At the top level plain `BEGIN` starts a transaction."""
    kw = keyword_at(tokens, i)
    if kw in _OPENERS:
        return True
    if kw == "BEGIN":
        return not top or keyword_at(tokens, i + 1) == "NOT"
    return _is_label(tokens, i) and opens_block(tokens, i + 2, top=False)


def routine_body(tokens: Tokens, i: int) -> int:
    """Where the body of `CREATE PROCEDURE/FUNCTION/TRIGGER/EVENT` (or `ALTER EVENT`) at `i`
    starts, or -1. Only words that cannot start a statement are skipped to find it."""
    if keyword_at(tokens, i) not in ("CREATE", "ALTER"):
        return -1
    obj = object_index(tokens, i + 1)
    kind = keyword_at(tokens, obj)
    if kind not in ROUTINES:
        return -1
    end = _next_semi(tokens, obj)
    if kind == "TRIGGER":
        k = _find_sequence(tokens, obj, end, ("FOR", "EACH", "ROW"))
        return k + 2 if k >= 0 and keyword_at(tokens, k) in ("FOLLOWS", "PRECEDES") else k
    if kind == "EVENT":
        k = _find_sequence(tokens, obj, end, ("DO",))
        return k
    params = next((k for k in range(obj, min(end, obj + 8)) if tokens[k].text == "("), -1)
    if params < 0:
        return -1  # a loadable function (`RETURNS STRING SONAME ...`) has no body
    return _skip_routine_header(tokens, _after_group(tokens, params))


def object_index(tokens: Tokens, k: int) -> int:
    """Skip `OR REPLACE`, `DEFINER = user` and similar words after CREATE/ALTER."""
    while k < len(tokens):
        kw = tokens[k].keyword
        if kw == "DEFINER":
            k = _skip_user(tokens, k + 2 if keyword_at(tokens, k + 1) == "" else k + 1)
        elif kw in _CREATE_PREFIX:
            k += 1
        else:
            return k
    return k


def _skip_user(tokens: Tokens, k: int) -> int:
    """Skip a user name: `'u'@'h'`, `u@h`, `CURRENT_USER[()]`."""
    if keyword_at(tokens, k) in ("CURRENT_USER", "CURRENT_ROLE"):
        k += 1
        return k + 2 if k < len(tokens) and tokens[k].text == "(" else k
    k += 1
    if k < len(tokens) and tokens[k].kind == VARIABLE:
        k += 2 if tokens[k].text == "@" else 1
    return k


def _find_sequence(tokens: Tokens, k: int, end: int, words: tuple[str, ...]) -> int:
    """The index after the first run of `words` in tokens[k:end], or -1."""
    size = len(words)
    for j in range(k, end - size + 1):
        if all(tokens[j + n].keyword == w for n, w in enumerate(words)):
            return j + size
    return -1


def _after_group(tokens: Tokens, k: int) -> int:
    """The index after the parenthesised group opening at `k`."""
    depth = 0
    for j in range(k, len(tokens)):
        text = tokens[j].text
        if text == "(":
            depth += 1
        elif text == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        elif tokens[j].kind == SEMI:
            return j
    return len(tokens)


def _skip_routine_header(tokens: Tokens, k: int) -> int:
    while k < len(tokens):
        kw = tokens[k].keyword
        if kw == "COMMENT":
            k += 2
        elif kw in _CHARACTERISTICS:
            k += 1
        elif kw == "RETURNS":
            k = _skip_type(tokens, k + 2)
        else:
            return k
    return k


def _skip_type(tokens: Tokens, k: int) -> int:
    """Skip the rest of a data type whose first word precedes `k`."""
    while k < len(tokens):
        kw = tokens[k].keyword
        if tokens[k].text == "(":
            k = _after_group(tokens, k)
        elif kw in _TYPE_WORDS:
            k += 1
        elif kw in ("CHARSET", "COLLATE"):
            k += 2
        elif kw == "CHARACTER" and keyword_at(tokens, k + 1) == "SET":
            k += 3
        else:
            return k
    return k


class _Blocks:
    """Follows the blocks of a compound statement to the `;` that ends it.

    Modes: at the start of a statement inside a block; inside a simple statement (until its
    `;`); inside a condition (`IF ... THEN`, `WHILE ... DO`, `UNTIL ... END REPEAT`), where
    CASE expressions nest. A missed block only ends the statement early (safe); a block
    is opened only where a statement starts.
    """

    _START, _STATEMENT, _CONDITION, _HANDLER = range(4)

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        self.depth = 0
        self.cases = 0  # CASE expressions open inside a condition
        self.declare = False  # the current statement is a DECLARE (may hold a handler)

    def end(self, k: int) -> tuple[int, str | None]:
        mode = self._START
        steps = {
            self._START: self._start,
            self._STATEMENT: self._statement,
            self._CONDITION: self._condition,
            self._HANDLER: self._handler,
        }
        while k < len(self.tokens):
            if mode == self._STATEMENT and self.tokens[k].kind == SEMI and self.depth == 0:
                return k, None
            k, mode = steps[mode](k)
        if self.depth:
            return k, "unterminated compound statement (BEGIN/IF/LOOP ... without END)"
        return k, None

    def _start(self, k: int) -> tuple[int, int]:
        tokens = self.tokens
        kw = tokens[k].keyword
        if _is_label(tokens, k):
            return k + 2, self._START
        if kw == "BEGIN":
            self.depth += 1
            return (k + 3 if keyword_at(tokens, k + 1) == "NOT" else k + 1), self._START
        if kw in ("LOOP", "REPEAT"):
            self.depth += 1
            return k + 1, self._START
        if kw in _OPENERS:
            self.depth += 1
            self.cases = 0
            return k + 1, self._CONDITION
        if kw in ("ELSEIF", "WHEN", "UNTIL"):
            self.cases = 0
            return k + 1, self._CONDITION
        if kw == "ELSE":
            return k + 1, self._START
        if kw == "END" and self.depth:
            return self._close(k), self._STATEMENT
        self.declare = kw == "DECLARE"
        return k, self._STATEMENT

    def _statement(self, k: int) -> tuple[int, int]:
        tokens = self.tokens
        if tokens[k].kind == SEMI:
            return k + 1, self._START
        if self.declare and tokens[k].keyword == "HANDLER" and keyword_at(tokens, k + 1) == "FOR":
            self.declare = False
            return k + 2, self._HANDLER
        return k + 1, self._STATEMENT

    def _condition(self, k: int) -> tuple[int, int]:
        token = self.tokens[k]
        kw = token.keyword
        if token.kind == SEMI:
            return k, self._STATEMENT
        if kw == "CASE":
            self.cases += 1
        elif kw == "END":
            if not self.cases:  # `UNTIL cond END REPEAT`
                return self._close(k), self._STATEMENT
            self.cases -= 1
        elif kw in ("THEN", "DO") and not self.cases:
            return k + 1, self._START
        return k + 1, self._CONDITION

    def _handler(self, k: int) -> tuple[int, int]:
        """Skip a handler's condition list; its statement follows."""
        tokens = self.tokens
        kw = tokens[k].keyword
        if kw == "NOT":
            k += 2
        elif kw == "SQLSTATE":
            k += 3 if keyword_at(tokens, k + 1) == "VALUE" else 2
        elif tokens[k].kind in (WORD, QUOTED_IDENT, NUMBER):
            k += 1
        if k < len(tokens) and tokens[k].text == ",":
            return k + 1, self._HANDLER
        return k, self._START

    def _close(self, k: int) -> int:
        """Close a block at its END: skip `END [IF|LOOP|...] [label]`."""
        self.depth -= 1
        k += 1
        if keyword_at(self.tokens, k) in _OPENERS:
            k += 1
        if k < len(self.tokens) and self.tokens[k].kind in (WORD, QUOTED_IDENT):
            k += 1
        return k


def identifier(token: Token) -> str:
    """A name as the server folds it: unquoted lower-cased, quoted as written."""
    if token.kind == QUOTED_IDENT:
        quote = token.text[0]
        return token.text[1:-1].replace(quote * 2, quote)
    return token.text.lower()


def tables(tokens: Tokens, *, on_names: bool = False) -> tuple[str, ...]:
    """Relations named after FROM, JOIN, INTO, UPDATE, TABLE ... (best effort; write
    targets always). `on_names`: names after ON too (CREATE INDEX/TRIGGER, GRANT)."""
    found: set[str] = set()
    subquery: list[bool] = []  # per open parenthesis: does it hold a query?
    renaming = False
    for k, token in enumerate(tokens):
        text = token.text
        if text == "(":
            subquery.append(keyword_at(tokens, k + 1) in _SUBQUERY_STARTS)
            continue
        if text == ")":
            if subquery:
                subquery.pop()
            continue
        if subquery and not subquery[-1]:
            continue  # function arguments, column lists
        kw = token.keyword
        if not kw:
            continue
        previous = tokens[k - 1].keyword if k else ""
        if kw in _NAME_LISTS or (kw == "ON" and on_names) or (kw == "TO" and renaming):
            _read_names(tokens, k + 1, found)
        elif (
            kw in ("UPDATE", "DELETE", "INSERT", "REPLACE") and previous not in _NOT_A_TARGET_AFTER
        ):
            _read_names(tokens, _skip_modifiers(tokens, k + 1), found)
        elif kw in _FIRST_ONLY_NAMES and k == 0:
            _read_names(tokens, 1, found)
        elif kw == "RENAME":
            renaming = keyword_at(tokens, k + 1) not in _RENAMED_PARTS
    return tuple(sorted(found))


def _skip_modifiers(tokens: Tokens, k: int) -> int:
    while keyword_at(tokens, k) in _MODIFIERS:
        k += 1
    return k


def _read_names(tokens: Tokens, k: int, found: set[str]) -> None:
    """Read `[IF [NOT] EXISTS] name [[AS] alias] [, name ...]` from `k` into `found`."""
    if keyword_at(tokens, k) == "IF":
        k += 3 if keyword_at(tokens, k + 1) == "NOT" else 2
    while True:
        name, k = _read_name(tokens, k)
        if name is None:
            return
        found.add(name)
        k = _skip_alias(tokens, k)
        if k >= len(tokens) or tokens[k].text != ",":
            return
        k += 1


def _read_name(tokens: Tokens, k: int) -> tuple[str | None, int]:
    """A possibly qualified name at `k` (`db.tbl`; a trailing `.*` is dropped)."""
    if k >= len(tokens):
        return None, k
    first = tokens[k]
    if not (first.kind == QUOTED_IDENT or (first.kind == WORD and first.keyword not in _RESERVED)):
        return None, k
    parts = [identifier(first)]
    k += 1
    while k + 1 < len(tokens) and tokens[k].text == ".":
        part = tokens[k + 1]
        if part.kind not in (WORD, QUOTED_IDENT):
            k += 2 if part.text == "*" else 0
            break
        parts.append(identifier(part))
        k += 2
    return ".".join(parts), k


def _skip_alias(tokens: Tokens, k: int) -> int:
    if keyword_at(tokens, k) == "AS":
        k += 2
    elif k < len(tokens) and (
        tokens[k].kind == QUOTED_IDENT
        or (tokens[k].kind == WORD and tokens[k].keyword not in _RESERVED)
    ):
        k += 1
    while keyword_at(tokens, k) in _LOCK_MODES:
        k += 1
    return k
