"""PostgreSQL inspector: PostgreSQL's own parser (libpg_query via pglast) and a JSON walk.

`inspect(sql)` parses the text with `pglast.parser.parse_sql_json` (the C parser writes
JSON; no Python AST objects are built, which keeps a miss near 10-40 µs) and walks every
node of every statement, so that what a statement *runs* is seen wherever it hides:

- data-modifying CTEs (`WITH d AS (DELETE ...) SELECT ...`), MERGE actions, `COPY (DELETE
  ... RETURNING ...) TO`, `COPY ... FROM` (an INSERT), `EXPLAIN ANALYZE` (runs its query;
  plain EXPLAIN does not), `SELECT ... INTO` and `CREATE TABLE AS` (a CREATE);
- `ALTER TABLE ... DROP COLUMN/CONSTRAINT/...` (reported as ALTER and DROP);
- `DO` blocks: PL/pgSQL bodies are parsed with `parse_plpgsql_json` and their static SQL
  inspected; dynamic SQL (`EXECUTE 'text'`, `FOR ... IN EXECUTE`, `OPEN ... FOR EXECUTE`,
  `RETURN QUERY EXECUTE`) and `CALL` make the block opaque;
- `CALL`, SQL-level `EXECUTE` and functions that run SQL given as text (`dblink_exec`,
  `query_to_xml`, ...) are opaque: the engine lets them match every restrictive rule;
- `PREPARE name AS ...`, `CREATE RULE` and SQL function bodies store verbs for later
  (`deferred`), they do not run them now.

The inspector never raises: text it cannot read is a `parse_error`, which the engine denies
on any destination with a deny rule.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from pglast import parser

from policies.sql.model import StatementInfo, parse_error

Node = dict[str, Any]

# Statement node -> verb, for nodes whose verb is not derived from their name or fields.
_VERB_OF_NODE: dict[str, str] = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
    "CopyStmt": "COPY",
    "TruncateStmt": "TRUNCATE",
    "ExplainStmt": "EXPLAIN",
    "VariableSetStmt": "SET",
    "ConstraintsSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "TransactionStmt": "TRANSACTION",
    "CallStmt": "CALL",
    "DoStmt": "DO",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
    "LockStmt": "LOCK",
    "IndexStmt": "CREATE",
    "ViewStmt": "CREATE",
    "RuleStmt": "CREATE",
    "DefineStmt": "CREATE",
    "CompositeTypeStmt": "CREATE",
    "CreateTableAsStmt": "CREATE",
    "RenameStmt": "ALTER",
    "AlterObjectDependsStmt": "ALTER",
    "AlterObjectSchemaStmt": "ALTER",
    "AlterOwnerStmt": "ALTER",
    "RefreshMatViewStmt": "OTHER",
    "DropOwnedStmt": "DROP",
    "DropdbStmt": "DROP",
    "ReassignOwnedStmt": "OTHER",
    "CommentStmt": "OTHER",
    "SecLabelStmt": "OTHER",
    "CreateConversionStmt": "CREATE",
    "CreateCastStmt": "CREATE",
    "CreatedbStmt": "CREATE",
    "CreateRoleStmt": "CREATE",
    "ImportForeignSchemaStmt": "CREATE",
}

# Functions that run SQL handed to them as text: the inspector cannot see what they run.
_SQL_RUNNING_FUNCTIONS = frozenset(
    {
        "dblink",
        "dblink_exec",
        "dblink_open",
        "dblink_send_query",
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "ts_stat",
        "ts_rewrite",
    }
)

# PL/pgSQL statements that run SQL built at run time.
_PLPGSQL_DYNAMIC = frozenset(
    {"PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors", "PLpgSQL_stmt_call"}
)

# Drop-like objects whose names are relations (DROP INDEX names an index, not a table).
_RELATION_OBJECTS = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE"}
)

_SCS_OFF = (
    "standard_conforming_strings is off and the text contains a backslash: Sluice reads "
    "SQL as PostgreSQL does with it on, so it cannot tell where this string ends"
)


# Statements whose inspection can depend on a constant's value: a DO block's body is a string,
# so is a function body, and EXPLAIN's options may be quoted (`EXPLAIN (ANALYZE 'on')`); the
# others get special handling. A word match anywhere (even in a comment) only costs a cache
# opportunity, never a wrong decision.
_CONSTANT_SENSITIVE = re.compile(
    r"\b(?:do|explain|create|function|procedure|execute|prepare|call|copy)\b", re.IGNORECASE
)


def shape(sql: str) -> str | None:
    """The statement with every constant replaced by `$n` (libpg_query's normalisation), when
    its inspection cannot depend on the constants' values; None otherwise.

    Texts of one shape inspect alike, except for byte offsets (`span`), so a decision cache
    may share one entry between them; the caller shares only single-statement results.
    Comments and identifiers are kept, so texts that differ in anything but constants have
    different shapes. Assumes standard_conforming_strings is on.
    """
    low = sql.lower()
    # The words as plain substrings first: several times cheaper than the regex, and a text
    # without any of them cannot match it (most statements of most apps).
    if (
        "do" in low
        or "explain" in low
        or "create" in low
        or "function" in low
        or "procedure" in low
        or "execute" in low
        or "prepare" in low
        or "call" in low
        or "copy" in low
    ) and _CONSTANT_SENSITIVE.search(sql):
        return None
    try:
        return str(parser.normalize(sql))
    except Exception:  # does not parse: the caller inspects it and gets the error
        return None


def inspect(sql: str, *, standard_conforming_strings: bool = True) -> tuple[StatementInfo, ...]:
    """One `StatementInfo` per statement of `sql`, as PostgreSQL would parse it."""
    if not standard_conforming_strings and "\\" in sql:
        return (parse_error(_SCS_OFF),)
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError as exc:
        return (parse_error(str(exc)),)
    except Exception as exc:  # never raise: an inspector failure fails closed
        return (parse_error(f"the SQL parser failed: {exc}"),)
    try:
        return tuple(_statements(tree.get("stmts", []), len(sql.encode())))
    except Exception as exc:  # a bug here must deny, not crash the sidecar
        return (parse_error(f"internal inspector error ({type(exc).__name__}: {exc})"),)


def _statements(stmts: list[Node], total: int) -> Iterator[StatementInfo]:
    for raw in stmts:
        start = raw.get("stmt_location", 0)
        length = raw.get("stmt_len", 0)
        info = _inspect_node(raw["stmt"])
        yield _with_span(info, (start, start + length if length else total))


def _with_span(info: StatementInfo, span: tuple[int, int]) -> StatementInfo:
    return replace(info, span=span)


def _inspect_node(stmt: Node) -> StatementInfo:
    """Inspect one statement node (a one-key dict such as {"DeleteStmt": {...}})."""
    walk = _Walk()
    kind, body = next(iter(stmt.items()))
    verb = walk.top(kind, body)
    verbs = frozenset(walk.verbs | {verb})
    deferred = frozenset(walk.deferred - verbs) if walk.deferred else frozenset()
    return StatementInfo(
        verb=verb,
        verbs=verbs,
        tables=tuple(sorted(walk.tables)),
        no_where=walk.no_where,
        opaque=walk.opaque,
        deferred=deferred,
        prepare_name=walk.prepare_name,
        body=walk.prepared,
        execute_name=walk.execute_name,
        deallocate_name=walk.deallocate_name,
    )


class _Walk:
    """Accumulates what one statement runs while walking its JSON tree."""

    __slots__ = (
        "cte_names",
        "deallocate_name",
        "deferred",
        "execute_name",
        "no_where",
        "opaque",
        "prepare_name",
        "prepared",
        "tables",
        "targets",
        "verbs",
    )

    def __init__(self) -> None:
        self.verbs: set[str] = set()
        self.deferred: set[str] = set()
        self.tables: set[str] = set()
        self.targets: set[str] = set()
        self.cte_names: set[str] = set()
        self.no_where = False
        self.opaque = False
        self.prepare_name: str | None = None
        self.prepared: StatementInfo | None = None
        self.execute_name: str | None = None
        self.deallocate_name: str | None = None

    # -- the statement itself -------------------------------------------------------------

    def top(self, kind: str, body: Node) -> str:
        """Walk a top-level statement and return its verb."""
        verb = _verb_of(kind, body)
        handler = _TOP_HANDLERS.get(kind)
        if handler is not None:
            handler(self, body)
        else:
            self.walk(body)
        if kind == "SelectStmt" and "intoClause" in body:
            verb = "CREATE"  # SELECT ... INTO creates a table
        self._finish_tables()
        return verb

    def _finish_tables(self) -> None:
        # A bare name that is a CTE of this statement names the CTE, not a table; write
        # targets always name tables (a CTE cannot be the target of INSERT/UPDATE/DELETE).
        if self.cte_names:
            self.tables = {t for t in self.tables if t not in self.cte_names}
        self.tables |= self.targets

    # -- generic walk ---------------------------------------------------------------------

    def walk(self, value: Any) -> None:
        """Visit every node under `value`, dispatching the ones that matter."""
        if isinstance(value, dict):
            for key, child in value.items():
                handler = _NESTED_HANDLERS.get(key)
                if handler is not None:
                    handler(self, child)
                elif isinstance(child, dict | list):
                    self.walk(child)
        elif isinstance(value, list):
            for child in value:
                if isinstance(child, dict | list):
                    self.walk(child)

    # -- nested nodes ---------------------------------------------------------------------

    def select(self, node: Node) -> None:
        if "intoClause" in node:  # SELECT ... INTO creates a table
            self.verbs.add("CREATE")
            into = node["intoClause"]
            self._target(into.get("IntoClause", into).get("rel"))
        self.walk(node)

    def insert(self, node: Node) -> None:
        self.verbs.add("INSERT")
        self._target(node.get("relation"))
        self.walk(node)

    def update(self, node: Node) -> None:
        self.verbs.add("UPDATE")
        self._target(node.get("relation"))
        if "whereClause" not in node:
            self.no_where = True
        self.walk(node)

    def delete(self, node: Node) -> None:
        self.verbs.add("DELETE")
        self._target(node.get("relation"))
        if "whereClause" not in node:
            self.no_where = True
        self.walk(node)

    def merge(self, node: Node) -> None:
        self.verbs.add("MERGE")
        self._target(node.get("relation"))
        for clause in node.get("mergeWhenClauses", []):
            command = clause.get("MergeWhenClause", {}).get("commandType")
            verb = _MERGE_COMMANDS.get(command or "")
            if verb:
                self.verbs.add(verb)
        self.walk(node)

    def copy(self, node: Node) -> None:
        self.verbs.add("COPY")
        if node.get("is_from"):
            self.verbs.add("INSERT")
            self._target(node.get("relation"))
        if node.get("is_program"):
            self.opaque = True  # COPY ... PROGRAM runs a shell command on the server
        self.walk(node)

    def truncate(self, node: Node) -> None:
        self.verbs.add("TRUNCATE")
        for rel in node.get("relations", []):
            self._target(rel.get("RangeVar"))

    def explain(self, node: Node) -> None:
        analyze = any(
            opt.get("DefElem", {}).get("defname") == "analyze" and _true(opt["DefElem"].get("arg"))
            for opt in node.get("options", [])
        )
        query = node.get("query", {})
        if analyze and query:  # EXPLAIN ANALYZE runs the statement
            kind, body = next(iter(query.items()))
            self.verbs.add(_verb_of(kind, body))
            self.walk(query)
        else:
            inert = _Walk()  # plain EXPLAIN only plans it: collect its tables, not its verbs
            inert.walk(query)
            self.tables |= inert.tables | inert.targets
            self.cte_names |= inert.cte_names

    def ctas(self, node: Node) -> None:
        self.verbs.add("CREATE")
        into = node.get("into", {})
        self._target(into.get("IntoClause", into).get("rel"))
        query = node.get("query", {})
        if "ExecuteStmt" in query:
            self.opaque = True
            self.execute_name = query["ExecuteStmt"].get("name")
            return
        self.walk(query)
        self.verbs.discard("SELECT")

    def alter_table(self, node: Node) -> None:
        self.verbs.add("ALTER")
        self._target(node.get("relation"))
        for cmd in node.get("cmds", []):
            subtype = cmd.get("AlterTableCmd", {}).get("subtype", "")
            if subtype.startswith("AT_Drop"):
                self.verbs.add("DROP")
        self.walk(node.get("cmds", []))

    def drop(self, node: Node) -> None:
        self.verbs.add("DROP")
        if node.get("removeType") in _RELATION_OBJECTS:
            for obj in node.get("objects", []):
                name = _qualified(obj)
                if name:
                    self.targets.add(name)

    def rule(self, node: Node) -> None:
        self._target(node.get("relation"))
        later = _Walk()
        later.walk(node.get("actions", []))
        for action in node.get("actions", []):
            later.verbs.add(_verb_of(*next(iter(action.items()))))
        self.deferred |= later.verbs

    def create_function(self, node: Node) -> None:
        body = node.get("sql_body")
        if body is not None:  # BEGIN ATOMIC ... END / RETURN expr: parsed, runs later
            later = _Walk()
            later.walk(body)
            self.deferred |= later.verbs
        self.walk(node.get("parameters", []))

    def prepare(self, node: Node) -> None:
        self.prepare_name = node.get("name")
        query = node.get("query", {})
        if query:
            self.prepared = _inspect_node(query)
            self.deferred |= self.prepared.verbs | self.prepared.deferred
            if self.prepared.opaque:
                self.deferred.add("OTHER")

    def execute(self, node: Node) -> None:
        self.opaque = True  # what runs is a prepared statement the session may know
        self.execute_name = node.get("name")
        self.walk(node.get("params", []))

    def deallocate(self, node: Node) -> None:
        self.deallocate_name = "*" if node.get("isall") or not node.get("name") else node["name"]

    def call(self, node: Node) -> None:
        self.opaque = True
        self.walk(node)

    def do(self, node: Node) -> None:
        code = None
        language = "plpgsql"
        for arg in node.get("args", []):
            elem = arg.get("DefElem", {})
            value = elem.get("arg", {}).get("String", {}).get("sval")
            if elem.get("defname") == "as":
                code = value
            elif elem.get("defname") == "language" and value is not None:
                language = value.lower()
        if code is None or language != "plpgsql":
            self.opaque = True  # another language's block: nothing we can read
            return
        self._plpgsql(code)

    def func_call(self, node: Node) -> None:
        names = node.get("funcname", [])
        if names:
            last = names[-1].get("String", {}).get("sval", "")
            if last.lower() in _SQL_RUNNING_FUNCTIONS:
                self.opaque = True
        self.walk(node)

    def cte(self, node: Node) -> None:
        name = node.get("ctename")
        if name:
            self.cte_names.add(name)
        self.walk(node)

    def range_var(self, node: Node) -> None:
        name = _relation_name(node)
        if name:
            self.tables.add(name)

    def _target(self, range_var: Node | None) -> None:
        if range_var:
            name = _relation_name(range_var)
            if name:
                self.targets.add(name)

    # -- PL/pgSQL -------------------------------------------------------------------------

    def _plpgsql(self, code: str) -> None:
        tag = "sluice"
        while f"${tag}$" in code:
            tag += "_"
        wrapper = (
            f"CREATE FUNCTION sluice_do() RETURNS void LANGUAGE plpgsql AS ${tag}${code}${tag}$"
        )
        try:
            functions = json.loads(parser.parse_plpgsql_json(wrapper))
        except Exception:
            self.opaque = True  # the server would reject it; we cannot see into it
            return
        self._plpgsql_walk(functions)

    def _plpgsql_walk(self, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                if key in _PLPGSQL_DYNAMIC or key == "dynquery":
                    self.opaque = True
                elif key == "PLpgSQL_expr":
                    self._plpgsql_expr(child)
                    continue
                elif key == "PLpgSQL_stmt_commit" or key == "PLpgSQL_stmt_rollback":
                    self.verbs.add("TRANSACTION")
                if isinstance(child, dict | list):
                    self._plpgsql_walk(child)
        elif isinstance(value, list):
            for child in value:
                self._plpgsql_walk(child)

    def _plpgsql_expr(self, expr: Node) -> None:
        query = expr.get("query", "")
        mode = expr.get("parseMode", 0)
        # Mode 0 is a whole SQL statement; 2 an expression PL/pgSQL evaluates as `SELECT
        # expr` (conditions, RETURN values); 3-5 an assignment `target := expr`.
        if mode in _PLPGSQL_ASSIGN:
            _, sep, query = query.partition(":=")
            if not sep:
                self.opaque = True
                return
        text = query if mode == 0 else f"SELECT {query}"
        for info in inspect(text):
            if info.error is not None:
                self.opaque = True
                continue
            # A SELECT that reads no table (PERFORM 1, x := y + 1) is computation, not a read.
            self.verbs |= info.verbs if info.tables else info.verbs - {"SELECT"}
            self.tables |= set(info.tables)
            self.no_where |= info.no_where
            self.opaque |= info.opaque
            self.deferred |= info.deferred


_PLPGSQL_ASSIGN = frozenset({3, 4, 5})  # RAW_PARSE_PLPGSQL_ASSIGN1..3
_MERGE_COMMANDS = {"CMD_UPDATE": "UPDATE", "CMD_INSERT": "INSERT", "CMD_DELETE": "DELETE"}

# Handlers for statements at the top level (the statement being inspected).
_TOP_HANDLERS = {
    "SelectStmt": _Walk.select,
    "InsertStmt": _Walk.insert,
    "UpdateStmt": _Walk.update,
    "DeleteStmt": _Walk.delete,
    "MergeStmt": _Walk.merge,
    "CopyStmt": _Walk.copy,
    "TruncateStmt": _Walk.truncate,
    "ExplainStmt": _Walk.explain,
    "CreateTableAsStmt": _Walk.ctas,
    "AlterTableStmt": _Walk.alter_table,
    "DropStmt": _Walk.drop,
    "RuleStmt": _Walk.rule,
    "CreateFunctionStmt": _Walk.create_function,
    "PrepareStmt": _Walk.prepare,
    "ExecuteStmt": _Walk.execute,
    "DeallocateStmt": _Walk.deallocate,
    "CallStmt": _Walk.call,
    "DoStmt": _Walk.do,
}

# Handlers for nodes met anywhere inside a statement.
_NESTED_HANDLERS = {
    "SelectStmt": _Walk.select,
    "InsertStmt": _Walk.insert,
    "UpdateStmt": _Walk.update,
    "DeleteStmt": _Walk.delete,
    "MergeStmt": _Walk.merge,
    "FuncCall": _Walk.func_call,
    "CommonTableExpr": _Walk.cte,
    "RangeVar": _Walk.range_var,
    # Statements nested in others (CREATE SCHEMA ... CREATE TABLE ..., EXPLAIN ANALYZE
    # CREATE TABLE AS ...): their own handlers apply.
    "CreateTableAsStmt": _Walk.ctas,
    "ExecuteStmt": _Walk.execute,
    "DropStmt": _Walk.drop,
    "AlterTableStmt": _Walk.alter_table,
}


def _verb_of(kind: str, body: Node) -> str:
    verb = _VERB_OF_NODE.get(kind)
    if verb is not None:
        return verb
    if kind in ("GrantStmt", "GrantRoleStmt"):
        return "GRANT" if body.get("is_grant") else "REVOKE"
    if kind == "AlterDefaultPrivilegesStmt":
        action = body.get("action", {}).get("GrantStmt", {})
        return "GRANT" if action.get("is_grant") else "REVOKE"
    for prefix, prefixed in (("Create", "CREATE"), ("Alter", "ALTER"), ("Drop", "DROP")):
        if kind.startswith(prefix):
            return prefixed
    return "OTHER"


def _relation_name(range_var: Node) -> str | None:
    rel = range_var.get("RangeVar", range_var)
    name = rel.get("relname")
    if not name:
        return None
    parts = [p for p in (rel.get("catalogname"), rel.get("schemaname"), name) if p]
    return ".".join(parts)


def _qualified(obj: Node) -> str | None:
    """The dotted name of a DROP object given as a list of String nodes."""
    items = obj.get("List", {}).get("items", [])
    parts = [i.get("String", {}).get("sval") for i in items]
    if not parts or not all(parts):
        return None
    return ".".join(p for p in parts if p)


def _true(arg: Node | None) -> bool:
    """A DefElem option value: absent means true (`EXPLAIN (ANALYZE) ...`)."""
    if not arg:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval", False))
    if "String" in arg:
        return arg["String"].get("sval", "").lower() in ("true", "on", "1", "yes")
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0))
    return True
