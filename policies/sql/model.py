"""What SQL inspection reports about one statement: the contract between inspectors and the engine.

Every dialect's inspector turns a SQL string into a tuple of `StatementInfo`, one per
statement. The policy engine reads only these attributes; it never looks at SQL text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The verb vocabulary shared by every dialect and by the policy language (`sql.verbs`).
# Names are what a policy author writes; inspectors map their parse trees onto them.
VERBS: frozenset[str] = frozenset(
    {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "REPLACE",  # MySQL REPLACE: reported together with INSERT and DELETE
        "TRUNCATE",
        "COPY",
        "LOAD",  # MySQL LOAD DATA/XML: reported together with INSERT
        "CREATE",
        "ALTER",
        "DROP",
        "RENAME",  # MySQL RENAME TABLE/USER: reported together with ALTER
        "GRANT",
        "REVOKE",
        "EXPLAIN",
        "SET",
        "SHOW",
        "TRANSACTION",
        "CALL",
        "DO",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
        "LOCK",
        "OTHER",
    }
)

# Verbs that name a statement whose effect the inspector may not be able to see.
OPAQUE_VERBS: frozenset[str] = frozenset({"CALL", "DO", "EXECUTE"})


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """Normalised attributes of one SQL statement.

    verb:      the top-level verb (`WITH x AS (DELETE ...) SELECT ...` has verb SELECT).
    verbs:     every verb the statement runs now, including `verb` (that example: SELECT and
               DELETE). `EXPLAIN ANALYZE DELETE` runs DELETE; plain `EXPLAIN DELETE` does not.
               `ALTER TABLE ... DROP COLUMN/CONSTRAINT` reports ALTER and DROP.
    tables:    relations the statement reads or writes, as the server folds them (unquoted
               names lower-cased), schema-qualified when written so; sorted, unique.
    no_where:  an UPDATE or DELETE in the statement runs without a WHERE clause.
    opaque:    the statement runs something the inspector cannot see into (CALL, dynamic SQL
               in DO, EXECUTE of a prepared statement); the engine lets it match every verb
               and table of a restrictive rule.
    deferred:  verbs stored for later rather than run now (PREPARE ... AS DELETE, the actions
               of CREATE RULE, a function body). They are not in `verbs`.
    error:     the parse error, or None. A statement with an error has no verbs.
    prepare_name / body: for SQL-level `PREPARE name AS ...`, the name and the inspection of
               the prepared statement, so a session can decide its later EXECUTE.
    execute_name: for SQL-level `EXECUTE name`, the prepared statement it runs.
    deallocate_name: for `DEALLOCATE name` ("*" for DEALLOCATE ALL).
    span:      (start, end) byte offsets of this statement in the UTF-8 encoding of the
               inspected text, where the inspector knows them (lets a proxy replace exactly
               one statement of a multi-statement string); None otherwise.
    """

    verb: str
    verbs: frozenset[str]
    tables: tuple[str, ...] = ()
    no_where: bool = False
    opaque: bool = False
    deferred: frozenset[str] = frozenset()
    error: str | None = None
    prepare_name: str | None = None
    body: StatementInfo | None = field(default=None, compare=False)
    execute_name: str | None = None
    deallocate_name: str | None = None
    span: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        """The JSON form printed by `sluice sql inspect` (stable keys)."""
        out: dict[str, object] = {
            "verb": self.verb,
            "verbs": sorted(self.verbs),
            "tables": list(self.tables),
            "no_where": self.no_where,
            "opaque": self.opaque,
            "deferred": sorted(self.deferred),
            "error": self.error,
        }
        if self.prepare_name is not None:
            out["prepare_name"] = self.prepare_name
        if self.execute_name is not None:
            out["execute_name"] = self.execute_name
        if self.deallocate_name is not None:
            out["deallocate_name"] = self.deallocate_name
        return out


def parse_error(message: str) -> StatementInfo:
    """The result for text that does not parse: no verbs, so only the error can decide it."""
    return StatementInfo(verb="UNKNOWN", verbs=frozenset(), error=message)
