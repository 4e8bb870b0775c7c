"""Mask literals in SQL text for the audit trail: `WHERE card = '4111...'` -> `WHERE card = ?`.

Statements are recorded with every constant replaced by `?`, so the audit trail shows what
ran without the data it carried; full text is recorded only when configured. Masking uses
each dialect's real lexer, so a quote inside a comment or an escaped quote cannot unmask
what follows. Text the lexer rejects is not recorded at all.
"""

from __future__ import annotations

from pglast import parser

from policies.sql.inspect import SessionState

# PostgreSQL scanner token names that carry data.
_PG_LITERALS = frozenset({"SCONST", "ICONST", "FCONST", "BCONST", "XCONST", "USCONST"})
UNMASKABLE = "<statement not recorded: it could not be tokenised>"


def mask(sql: str, state: SessionState) -> str:
    """`sql` with every literal replaced by `?` (a whole dollar-quoted body included)."""
    if state.dialect == "postgres":
        return _mask_postgres(sql, state)
    return _mask_mysql(sql, state)


def _mask_postgres(sql: str, state: SessionState) -> str:
    if not state.standard_conforming_strings and "\\" in sql:
        return UNMASKABLE  # the scanner would read backslash escapes differently
    try:
        tokens = parser.scan(sql)
    except Exception:
        return UNMASKABLE
    out = []
    pos = 0
    for tok in tokens:
        if tok.name in _PG_LITERALS:
            out.append(sql[pos : tok.start])
            out.append("?")
            pos = tok.end + 1
    out.append(sql[pos:])
    return "".join(out)


def _mask_mysql(sql: str, state: SessionState) -> str:
    from policies.sql import mysql_lexer

    try:
        return mysql_lexer.mask_literals(
            sql,
            server_version=state.server_version,
            mariadb=state.mariadb,
            ansi_quotes=state.ansi_quotes,
            no_backslash_escapes=state.no_backslash_escapes,
        )
    except Exception:
        return UNMASKABLE
