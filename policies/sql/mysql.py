"""MySQL/MariaDB inspection: SQL text in, one `StatementInfo` per statement out.

There is no full grammar here. The exact lexer (`mysql_lexer`) decides what the server
reads, comments and version comments included; `mysql_structure` finds where each
statement ends; a token-level recogniser then names each statement by its leading keywords.
What it does not recognise is a parse error, which the engine denies on guarded
destinations: the recogniser fails closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from policies.sql.model import StatementInfo, parse_error
from policies.sql.mysql_lexer import STRING, LexError, Token, tokenize
from policies.sql.mysql_structure import (
    ROUTINES,
    Tokens,
    identifier,
    keyword_at,
    object_index,
    opens_block,
    pieces,
    routine_body,
    tables,
)

_STATEMENT_STARTS = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "TABLE", "VALUES", "WITH"}
)
# Keywords whose verbs a stored program's body may run later (generous: any occurrence).
_BODY_KEYWORDS = frozenset(
    {"INSERT", "UPDATE", "DELETE", "REPLACE", "TRUNCATE", "LOAD", "DROP", "ALTER", "CREATE"}
    | {"RENAME", "GRANT", "REVOKE", "CALL", "EXECUTE"}
)
# Verbs reported together (see model.VERBS).
_REPORTED_WITH = {
    "REPLACE": ("REPLACE", "INSERT", "DELETE"),
    "RENAME": ("RENAME", "ALTER"),
    "LOAD": ("LOAD", "INSERT"),
}
_OTHER_STATEMENTS = frozenset(
    {"USE", "FLUSH", "KILL", "OPTIMIZE", "CHECK", "CHECKSUM", "REPAIR", "INSTALL", "UNINSTALL"}
    | {"RESET", "PURGE", "HELP", "BINLOG", "SIGNAL", "RESIGNAL", "SHUTDOWN", "BACKUP"}
)


# MySQL string escapes; \% and \_ keep their backslash (for LIKE patterns).
_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}
_ESCAPES |= {"%": "\\%", "_": "\\_"}
_ESCAPED = {quote: re.compile(rf"\\([\s\S])|{quote}{quote}") for quote in "'\""}


@dataclass(frozen=True, slots=True)
class _Options:
    server_version: int
    mariadb: bool
    ansi_quotes: bool
    no_backslash_escapes: bool

    def tokenize(self, sql: str) -> list[Token]:
        return tokenize(
            sql,
            server_version=self.server_version,
            mariadb=self.mariadb,
            ansi_quotes=self.ansi_quotes,
            no_backslash_escapes=self.no_backslash_escapes,
        )


def inspect(
    sql: str,
    *,
    server_version: int = 101100,
    mariadb: bool = True,
    ansi_quotes: bool = False,
    no_backslash_escapes: bool = False,
) -> tuple[StatementInfo, ...]:
    """Inspect `sql` as a server of this version and sql_mode reads it. Never raises."""
    options = _Options(server_version, mariadb, ansi_quotes, no_backslash_escapes)
    try:
        return _inspect(sql, options)
    except LexError as exc:
        return (parse_error(str(exc)),)
    except Exception as exc:  # a bug in the recogniser must deny, not crash the proxy
        return (parse_error(f"internal error inspecting statement: {exc!r}"),)


def split(
    sql: str,
    *,
    server_version: int,
    mariadb: bool,
    ansi_quotes: bool,
    no_backslash_escapes: bool,
) -> list[str]:
    """The text of each statement of `sql`; text the lexer rejects is returned whole."""
    options = _Options(server_version, mariadb, ansi_quotes, no_backslash_escapes)
    try:
        tokens = options.tokenize(sql)
    except LexError:
        return [sql] if sql.strip() else []
    return [sql[p.start : p.end] for p in pieces(sql, tokens)]


def _inspect(sql: str, options: _Options) -> tuple[StatementInfo, ...]:
    ascii_only = sql.isascii()
    out = []
    for piece in pieces(sql, options.tokenize(sql)):
        info = parse_error(piece.error) if piece.error else _classify(piece.tokens, options)
        if ascii_only:
            span = (piece.start, piece.end)
        else:
            span = (_byte_offset(sql, piece.start), _byte_offset(sql, piece.end))
        out.append(replace(info, span=span))
    return tuple(out)


def _byte_offset(sql: str, index: int) -> int:
    return len(sql[:index].encode("utf-8", "surrogatepass"))


# --- recognising one statement -----------------------------------------------------------

Handler = Callable[[Tokens, _Options], StatementInfo]


def _classify(tokens: Tokens, options: _Options) -> StatementInfo:
    if opens_block(tokens, 0, top=True):
        return StatementInfo(verb="OTHER", verbs=frozenset({"OTHER"}), opaque=True)
    first = tokens[0]
    handler = _select if first.text == "(" else _HANDLERS.get(first.keyword)
    if handler is None:
        return parse_error(f"unrecognised statement starting with {first.text!r}")
    return handler(tokens, options)


def _simple(verb: str, *extra: str, with_tables: bool = True, on_names: bool = False) -> Handler:
    """A handler reporting `verb` (and `extra` verbs) with the statement's tables."""
    verbs = frozenset({verb, *extra})

    def handle(tokens: Tokens, options: _Options) -> StatementInfo:
        return StatementInfo(verb, verbs, tables(tokens, on_names=on_names) if with_tables else ())

    return handle


_select = _simple("SELECT")
_other = _simple("OTHER")
_transaction = _simple("TRANSACTION", with_tables=False)


def _reads(tokens: Tokens) -> frozenset[str]:
    """SELECT when a data-changing statement also reads through a query."""
    return frozenset({"SELECT"}) if any(t.keyword == "SELECT" for t in tokens) else frozenset()


def _upserts(tokens: Tokens) -> frozenset[str]:
    """UPDATE for `INSERT ... ON DUPLICATE KEY UPDATE`, which changes existing rows."""
    for k in range(1, len(tokens) - 1):
        if tokens[k].keyword == "DUPLICATE" and keyword_at(tokens, k + 2) == "UPDATE":
            return frozenset({"UPDATE"})
    return frozenset()


def _has_where(tokens: Tokens) -> bool:
    depth = 0
    for token in tokens:
        if token.text == "(":
            depth += 1
        elif token.text == ")":
            depth -= 1
        elif depth == 0 and token.keyword == "WHERE":
            return True
    return False


def _dml(verb: str, *extra: str) -> Handler:
    base = frozenset({verb, *extra})
    checks_where = verb in ("UPDATE", "DELETE")

    def handle(tokens: Tokens, options: _Options) -> StatementInfo:
        return StatementInfo(
            verb,
            base | _reads(tokens[1:]) | _upserts(tokens),
            tables(tokens),
            no_where=checks_where and not _has_where(tokens),
        )

    return handle


def _with(tokens: Tokens, options: _Options) -> StatementInfo:
    """`WITH ... SELECT/UPDATE/DELETE/INSERT`: the statement after the CTEs decides."""
    depth = 0
    for k in range(1, len(tokens)):
        token = tokens[k]
        if token.text == "(":
            if depth == 0 and tokens[k - 1].text == ")":
                break  # `WITH c AS (...) (SELECT ...)`
            depth += 1
        elif token.text == ")":
            depth -= 1
        elif depth == 0 and token.keyword in _STATEMENT_STARTS - {"WITH"}:
            break
    else:
        return parse_error("WITH without a statement after it")
    inner = _classify(tokens[k:], options)
    if not inner.ok:
        return inner
    return replace(inner, verbs=inner.verbs | {"SELECT"}, tables=tables(tokens))


def _load(tokens: Tokens, options: _Options) -> StatementInfo:
    kind = keyword_at(tokens, 1)
    if kind == "INDEX":
        return _other(tokens, options)
    if kind not in ("DATA", "XML"):
        return parse_error("LOAD without DATA, XML or INDEX")
    verbs = {"LOAD", "INSERT"}
    if any(t.keyword == "REPLACE" for t in tokens):
        verbs.add("DELETE")
    return StatementInfo("LOAD", frozenset(verbs), tables(tokens))


def _create(tokens: Tokens, options: _Options) -> StatementInfo:
    kind = keyword_at(tokens, object_index(tokens, 1))
    verbs = {"CREATE"}
    if keyword_at(tokens, 1) == "OR":  # CREATE OR REPLACE drops what it replaces
        verbs.add("DROP")
    if kind in ROUTINES:
        body = routine_body(tokens, 0)
        header = tokens[:body] if body >= 0 else tokens
        deferred = _body_verbs(tokens[body:]) if body >= 0 else frozenset()
        return StatementInfo(
            "CREATE", frozenset(verbs), tables(header, on_names=True), deferred=deferred
        )
    if kind == "TABLE" and any(t.keyword == "SELECT" for t in tokens):
        verbs |= {"INSERT", "SELECT"}
    return StatementInfo("CREATE", frozenset(verbs), tables(tokens, on_names=kind == "INDEX"))


def _body_verbs(tokens: Tokens) -> frozenset[str]:
    verbs: set[str] = set()
    for token in tokens:
        if token.keyword in _BODY_KEYWORDS:
            verbs.update(_REPORTED_WITH.get(token.keyword, (token.keyword,)))
    return frozenset(verbs)


def _alter(tokens: Tokens, options: _Options) -> StatementInfo:
    """ALTER; any DROP (column, index, partition, even `DROP DEFAULT`) or TRUNCATE
    (partition) in it is reported too. An event's new body runs later."""
    body = routine_body(tokens, 0)
    header = tokens[:body] if body >= 0 else tokens
    verbs = {"ALTER"} | {t.keyword for t in header if t.keyword in ("DROP", "TRUNCATE")}
    deferred = _body_verbs(tokens[body:]) if body >= 0 else frozenset()
    return StatementInfo("ALTER", frozenset(verbs), tables(header), deferred=deferred)


def _drop(tokens: Tokens, options: _Options) -> StatementInfo:
    if keyword_at(tokens, 1) == "PREPARE":
        return _deallocate(tokens, options)
    return StatementInfo("DROP", frozenset({"DROP"}), tables(tokens, on_names=True))


def _explain(tokens: Tokens, options: _Options) -> StatementInfo:
    """EXPLAIN/DESCRIBE: only `EXPLAIN ANALYZE` (MySQL) runs the statement it explains."""
    k = 1
    analyze = False
    while k < len(tokens) and tokens[k].keyword not in _STATEMENT_STARTS:
        if tokens[k].text == "(":
            break
        analyze = analyze or tokens[k].keyword == "ANALYZE"
        k += 1
    if k == len(tokens):  # DESCRIBE t, EXPLAIN FOR CONNECTION n
        return StatementInfo("EXPLAIN", frozenset({"EXPLAIN"}), tables(tokens))
    return _explained(tokens[k:], options, runs=analyze)


def _explained(tokens: Tokens, options: _Options, *, runs: bool) -> StatementInfo:
    inner = _classify(tokens, options)
    if not inner.ok:
        return inner
    if not runs:
        return StatementInfo("EXPLAIN", frozenset({"EXPLAIN"}), inner.tables)
    return StatementInfo(
        "EXPLAIN",
        inner.verbs | {"EXPLAIN"},
        inner.tables,
        no_where=inner.no_where,
        opaque=inner.opaque,
    )


def _analyze(tokens: Tokens, options: _Options) -> StatementInfo:
    """`ANALYZE TABLE t` maintains statistics; MariaDB's `ANALYZE <statement>` runs it."""
    k = 1
    while keyword_at(tokens, k) in ("FORMAT", "JSON") or (
        k < len(tokens) and tokens[k].text == "="
    ):
        k += 1
    second = keyword_at(tokens, k)
    if second not in ("TABLE", "TABLES") and (
        second in _STATEMENT_STARTS or (k < len(tokens) and tokens[k].text == "(")
    ):
        return _explained(tokens[k:], options, runs=True)
    return _other(tokens, options)


def _set(tokens: Tokens, options: _Options) -> StatementInfo:
    second = keyword_at(tokens, 1)
    if "TRANSACTION" in (second, keyword_at(tokens, 2)):
        return StatementInfo("TRANSACTION", frozenset({"TRANSACTION"}))
    if second == "STATEMENT":
        return _set_statement(tokens, options)
    return StatementInfo("SET", frozenset({"SET"}))


def _set_statement(tokens: Tokens, options: _Options) -> StatementInfo:
    """MariaDB's `SET STATEMENT var = value FOR <statement>` runs the statement."""
    depth = 0
    for k in range(2, len(tokens) - 1):
        depth += {"(": 1, ")": -1}.get(tokens[k].text, 0)
        if depth == 0 and tokens[k].keyword == "FOR":
            inner = _classify(tokens[k + 1 :], options)
            return replace(inner, verbs=inner.verbs | {"SET"}) if inner.ok else inner
    return parse_error("SET STATEMENT without FOR <statement>")


def _call(tokens: Tokens, options: _Options) -> StatementInfo:
    """A stored procedure can run anything: opaque."""
    return StatementInfo("CALL", frozenset({"CALL"}), opaque=True)


def _start(tokens: Tokens, options: _Options) -> StatementInfo:
    second = keyword_at(tokens, 1)
    if second == "TRANSACTION":
        return _transaction(tokens, options)
    if second in ("SLAVE", "REPLICA", "ALL", "GROUP_REPLICATION"):
        return _other(tokens, options)
    return parse_error(f"unrecognised START {second}")


def _needs(second: frozenset[str], handler: Handler, what: str) -> Handler:
    """A handler for statements recognised by their second keyword."""

    def handle(tokens: Tokens, options: _Options) -> StatementInfo:
        if keyword_at(tokens, 1) in second:
            return handler(tokens, options)
        return parse_error(f"unrecognised {tokens[0].keyword} statement: expected {what}")

    return handle


def _prepare(tokens: Tokens, options: _Options) -> StatementInfo:
    """`PREPARE name FROM '...'` stores a statement; its body is inspected now, decided at
    EXECUTE. From a variable or expression the body is unknown."""
    if len(tokens) < 4 or keyword_at(tokens, 2) != "FROM":
        return parse_error("PREPARE without `name FROM source`")
    name = _statement_name(tokens[1])
    source = tokens[3:]
    if not all(t.kind == STRING for t in source):
        return StatementInfo(
            "PREPARE", frozenset({"PREPARE"}), prepare_name=name, deferred=frozenset({"OTHER"})
        )
    body = _inspect_text("".join(_string_value(t, options) for t in source), options)
    deferred = body.verbs if body.ok else frozenset({"OTHER"})
    return StatementInfo(
        "PREPARE", frozenset({"PREPARE"}), prepare_name=name, body=body, deferred=deferred
    )


def _inspect_text(sql: str, options: _Options) -> StatementInfo:
    """The inspection of the one statement held in a string (PREPARE, EXECUTE IMMEDIATE)."""
    try:
        results = _inspect(sql, options)
    except LexError as exc:
        return parse_error(str(exc))
    if len(results) != 1:
        return parse_error(f"dynamic SQL holds {len(results)} statements, not one")
    return replace(results[0], span=None)


def _execute(tokens: Tokens, options: _Options) -> StatementInfo:
    """`EXECUTE name` runs a prepared statement (opaque here; the session knows its body);
    MariaDB's `EXECUTE IMMEDIATE '...'` runs its string now."""
    if keyword_at(tokens, 1) != "IMMEDIATE":
        name = _statement_name(tokens[1]) if len(tokens) > 1 else None
        return StatementInfo("EXECUTE", frozenset({"EXECUTE"}), opaque=True, execute_name=name)
    source = tokens[2:]
    if not source or not all(t.kind == STRING for t in source):
        return StatementInfo("EXECUTE", frozenset({"EXECUTE"}), opaque=True)
    inner = _inspect_text("".join(_string_value(t, options) for t in source), options)
    if not inner.ok:
        return inner
    return replace(inner, verb="EXECUTE", verbs=inner.verbs | {"EXECUTE"})


def _deallocate(tokens: Tokens, options: _Options) -> StatementInfo:
    if keyword_at(tokens, 1) != "PREPARE" or len(tokens) < 3:
        return parse_error("expected DEALLOCATE PREPARE name")
    name = _statement_name(tokens[2])
    return StatementInfo("DEALLOCATE", frozenset({"DEALLOCATE"}), deallocate_name=name)


def _statement_name(token: Token) -> str:
    """Prepared statement names are case-insensitive in MySQL."""
    return identifier(token).lower()


def _string_value(token: Token, options: _Options) -> str:
    """The value of a string literal as the server reads it (introducer dropped)."""
    text = token.text
    quote_at = min(i for i in (text.find("'"), text.find('"')) if i >= 0)  # skip _cs / N
    quote = text[quote_at]
    body = text[quote_at + 1 : -1]
    if options.no_backslash_escapes:
        return body.replace(quote * 2, quote)
    return _ESCAPED[quote].sub(
        lambda m: _ESCAPES.get(m.group(1), m.group(1)) if m.group(1) else quote, body
    )


_HANDLERS: dict[str, Handler] = {
    "SELECT": _select,
    "TABLE": _select,
    "VALUES": _select,
    "HANDLER": _select,
    "WITH": _with,
    "INSERT": _dml("INSERT"),
    "UPDATE": _dml("UPDATE"),
    "DELETE": _dml("DELETE"),
    "REPLACE": _dml("REPLACE", "INSERT", "DELETE"),
    "LOAD": _load,
    "TRUNCATE": _simple("TRUNCATE"),
    "CREATE": _create,
    "ALTER": _alter,
    "DROP": _drop,
    "RENAME": _simple("RENAME", "ALTER"),
    "GRANT": _simple("GRANT", on_names=True),
    "REVOKE": _simple("REVOKE", on_names=True),
    "EXPLAIN": _explain,
    "DESCRIBE": _explain,
    "DESC": _explain,
    "ANALYZE": _analyze,
    "SET": _set,
    "SHOW": _simple("SHOW", with_tables=False),
    "START": _start,
    "BEGIN": _transaction,
    "COMMIT": _transaction,
    "ROLLBACK": _transaction,
    "SAVEPOINT": _transaction,
    "RELEASE": _transaction,
    "XA": _transaction,
    "CALL": _call,
    "DO": _simple("DO"),
    "PREPARE": _prepare,
    "EXECUTE": _execute,
    "DEALLOCATE": _deallocate,
    "LOCK": _needs(frozenset({"TABLE", "TABLES"}), _simple("LOCK"), "TABLES"),
    "UNLOCK": _needs(frozenset({"TABLE", "TABLES"}), _simple("LOCK"), "TABLES"),
    "GET": _needs(frozenset({"DIAGNOSTICS", "CURRENT", "STACKED"}), _other, "DIAGNOSTICS"),
    "CHANGE": _needs(frozenset({"MASTER", "REPLICATION"}), _other, "MASTER"),
    "CACHE": _needs(frozenset({"INDEX"}), _other, "INDEX"),
    "STOP": _needs(frozenset({"SLAVE", "REPLICA", "ALL", "GROUP_REPLICATION"}), _other, "SLAVE"),
} | dict.fromkeys(_OTHER_STATEMENTS, _other)
