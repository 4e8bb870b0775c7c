"""Compile validated policies into immutable matchers, indexed per (destination, source app).

A `View` holds only the rules that can apply between one source app and one destination,
pre-split by SQL verb and HTTP method, so deciding costs the same whether the policy set has
ten rules or a thousand that cannot match. Views are built lazily and memoised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from policies.attributes import HttpRequest
from policies.globs import compile_path_glob
from policies.spec import Action, Policy, Rule
from policies.sql.model import OPAQUE_VERBS, VERBS, StatementInfo
from policies.windows import Clock, LocalTime

# Bound on memoised views: sources and destinations are service names, so this is only
# reached by a misbehaving caller inventing names; then we start over rather than grow.
MAX_VIEWS = 10_000


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """One rule with everything it needs to match precompiled."""

    rule: Rule
    id: str
    seq: int  # position in the whole policy set: candidate lists keep this order
    zone: ZoneInfo
    paths: tuple[re.Pattern[str], ...] | None
    restrictive: bool  # deny, limit and audit rules: an unknown (opaque) statement matches

    def matches_sql(self, st: StatementInfo, clock: Clock, now: float) -> bool:
        """Fast path; must agree with `why_not(...) is None` (a property test checks)."""
        rule = self.rule
        if rule.http is not None:
            return False
        sql = rule.sql
        if sql is not None:
            if st.opaque:
                if not self.restrictive and not _opaque_allowed(sql.verbs, sql.tables, st):
                    return False
            else:
                if sql.verbs is not None and sql.verbs.isdisjoint(st.verbs):
                    return False
                if sql.tables is not None and not any(sql.tables.matches(t) for t in st.tables):
                    return False
                if sql.where_absent and not st.no_where:
                    return False
        window = rule.window
        return window is None or window.contains(clock.local(now, self.zone))

    def matches_http(self, req: HttpRequest, clock: Clock, now: float) -> bool:
        rule = self.rule
        if rule.sql is not None:
            return False
        http = rule.http
        if http is not None:
            if http.methods is not None and req.method not in http.methods:
                return False
            if self.paths is not None and not any(p.match(req.path) for p in self.paths):
                return False
            if http.hosts is not None and not http.hosts.matches(host_name(req.host)):
                return False
            for name, values in http.headers:
                if not any(values.matches(v) for v in req.header(name)):
                    return False
        window = rule.window
        return window is None or window.contains(clock.local(now, self.zone))

    def why_not(
        self, source: str, request: StatementInfo | HttpRequest, local: LocalTime
    ) -> str | None:
        """Slow path for `explain`: the first condition that fails, or None when it matches."""
        rule = self.rule
        if not rule.sources.matches(source):
            return f"from: {source!r} is not in {rule.sources.describe()}"
        if isinstance(request, StatementInfo):
            if rule.http is not None:
                return "http: the request is SQL"
            sql = rule.sql
            if sql is not None:
                if request.opaque:
                    if not self.restrictive and not _opaque_allowed(sql.verbs, sql.tables, request):
                        return (
                            f"sql: the statement is opaque ({request.verb}); an allow rule "
                            "matches it only by naming its verb and no tables"
                        )
                else:
                    if sql.verbs is not None and sql.verbs.isdisjoint(request.verbs):
                        got = ", ".join(sorted(request.verbs)) or "none"
                        return f"sql.verbs: statement runs {got}, rule wants {_set(sql.verbs)}"
                    if sql.tables is not None and not any(
                        sql.tables.matches(t) for t in request.tables
                    ):
                        got = ", ".join(request.tables) or "none"
                        return (
                            f"sql.tables: statement uses {got}, rule wants {sql.tables.describe()}"
                        )
                    if sql.where_absent and not request.no_where:
                        return (
                            "sql.where: the statement has a WHERE clause (or is not UPDATE/DELETE)"
                        )
        else:
            if rule.sql is not None:
                return "sql: the request is HTTP"
            http = rule.http
            if http is not None:
                if http.methods is not None and request.method not in http.methods:
                    return f"http.methods: {request.method} is not in {_set(http.methods)}"
                if self.paths is not None and not any(p.match(request.path) for p in self.paths):
                    return f"http.paths: {request.path} matches none of {list(http.paths or ())}"
                if http.hosts is not None and not http.hosts.matches(host_name(request.host)):
                    return f"http.hosts: {request.host!r} is not in {http.hosts.describe()}"
                for name, values in http.headers:
                    if not any(values.matches(v) for v in request.header(name)):
                        return f"http.headers: {name} does not match {values.describe()}"
        window = rule.window
        if window is not None and not window.contains(local):
            return f"when: {local.describe()} ({self.zone.key}) is outside {window.describe()}"
        return None


@dataclass(frozen=True, slots=True)
class View:
    """The rules between one source app and one destination, indexed for the hot path."""

    rules: tuple[CompiledRule, ...]
    policies: tuple[Policy, ...]
    default: Action
    by_verb: dict[str, tuple[CompiledRule, ...]]  # rules for a verb, but for by_table's
    by_table: dict[str, dict[str, tuple[CompiledRule, ...]]]  # verb -> table name -> rules
    sql_any: tuple[CompiledRule, ...]  # SQL-capable rules without a verb condition
    opaque: tuple[CompiledRule, ...]  # rules to try for an opaque statement
    by_method: dict[str, tuple[CompiledRule, ...]]
    http_any: tuple[CompiledRule, ...]
    guard: tuple[CompiledRule, ...]  # deny rules of the destination (any source): parse errors
    timeless: bool  # no rule has a time window: a decision does not depend on the clock

    def sql_candidates(self, st: StatementInfo) -> tuple[CompiledRule, ...]:
        """Rules that may match `st`, in policy-set order: by verb, then, for rules that
        name only literal tables, by the statement's tables."""
        if st.opaque:
            return self.opaque
        verbs = st.verbs
        if not verbs:
            return self.sql_any
        if len(verbs) == 1:
            for verb in verbs:
                general = self.by_verb.get(verb, self.sql_any)
                tabled = self.by_table.get(verb)
                if not tabled or not st.tables:
                    return general
                extra = [r for t in st.tables for r in tabled.get(table_key(t), ())]
                return _ordered(general, extra) if extra else general
        found: list[CompiledRule] = []
        for verb in verbs:
            found.extend(self.by_verb.get(verb, self.sql_any))
            tabled = self.by_table.get(verb)
            if tabled:
                found.extend(r for t in st.tables for r in tabled.get(table_key(t), ()))
        return _ordered((), found)


def table_key(table: str) -> str:
    """The index key of a table reference: its lower-cased relation name without schema.
    Every literal table pattern that can match a reference shares the reference's key
    (see `globs.TableSet`: patterns match the full name or the bare name part)."""
    return table.rsplit(".", 1)[-1].lower()


def _literal_keys(rule: Rule) -> frozenset[str] | None:
    """The table keys of a rule whose table condition is only literal names, else None."""
    if rule.sql is None or rule.sql.tables is None:
        return None
    patterns = rule.sql.tables.names.patterns
    if any(any(c in p for c in "*?[") for p in patterns):
        return None
    return frozenset(table_key(p) for p in patterns)


def _ordered(first: tuple[CompiledRule, ...], more: list[CompiledRule]) -> tuple[CompiledRule, ...]:
    seen = {r.seq: r for r in first}
    for r in more:
        seen[r.seq] = r
    return tuple(seen[k] for k in sorted(seen))


class Compiled:
    """An immutable policy set plus the memo of its views."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        seq = iter(range(1 << 62))
        self._rules: tuple[tuple[Policy, tuple[CompiledRule, ...]], ...] = tuple(
            (p, tuple(_compile_rule(p, r, next(seq)) for r in p.rules)) for p in self.policies
        )
        self._views: dict[tuple[str, str], View] = {}

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for _, rules in self._rules)

    def view(self, destination: str, source: str) -> View:
        key = (destination, source)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            view = self._views[key] = self._build(destination, source)
        return view

    def rules_for(self, destination: str) -> list[tuple[Policy, tuple[CompiledRule, ...]]]:
        return [(p, rules) for p, rules in self._rules if p.destination.matches(destination)]

    def _build(self, destination: str, source: str) -> View:
        matched = self.rules_for(destination)
        policies = tuple(p for p, _ in matched)
        rules = tuple(r for _, rs in matched for r in rs if r.rule.sources.matches(source))
        guard = tuple(r for _, rs in matched for r in rs if r.rule.action is Action.DENY)
        # Several policies may guard one destination; any default deny wins (the safe side).
        default = Action.DENY if any(p.default is Action.DENY for p in policies) else Action.ALLOW
        sql_rules = [r for r in rules if r.rule.http is None]
        sql_any = tuple(r for r in sql_rules if r.rule.sql is None or r.rule.sql.verbs is None)
        by_verb: dict[str, tuple[CompiledRule, ...]] = {}
        by_table: dict[str, dict[str, tuple[CompiledRule, ...]]] = {}
        for verb in VERBS:
            general: list[CompiledRule] = []
            tabled: dict[str, list[CompiledRule]] = {}
            for r in sql_rules:
                sql = r.rule.sql
                if sql is not None and sql.verbs is not None and verb not in sql.verbs:
                    continue
                keys = _literal_keys(r.rule)
                if keys is None:
                    general.append(r)
                else:
                    for key in keys:
                        tabled.setdefault(key, []).append(r)
            by_verb[verb] = tuple(general)
            if tabled:
                by_table[verb] = {k: tuple(v) for k, v in tabled.items()}
        opaque = tuple(
            r
            for r in sql_rules
            if r.restrictive
            or r.rule.sql is None
            or r.rule.sql.verbs is None
            or r.rule.sql.verbs & OPAQUE_VERBS
        )
        http_rules = [r for r in rules if r.rule.sql is None]
        http_any = tuple(
            r for r in http_rules if r.rule.http is None or r.rule.http.methods is None
        )
        methods = {
            m
            for r in http_rules
            if r.rule.http and r.rule.http.methods
            for m in r.rule.http.methods
        }
        by_method = {
            m: tuple(
                r
                for r in http_rules
                if r.rule.http is None or r.rule.http.methods is None or m in r.rule.http.methods
            )
            for m in methods
        }
        timeless = all(r.rule.window is None for r in rules) and all(
            r.rule.window is None for r in guard
        )
        return View(
            rules,
            policies,
            default,
            by_verb,
            by_table,
            sql_any,
            opaque,
            by_method,
            http_any,
            guard,
            timeless,
        )


def _compile_rule(policy: Policy, rule: Rule, seq: int) -> CompiledRule:
    paths = None
    if rule.http is not None and rule.http.paths is not None:
        paths = tuple(compile_path_glob(p) for p in rule.http.paths)
    return CompiledRule(
        rule=rule,
        id=rule.id,
        seq=seq,
        zone=policy.zone,
        paths=paths,
        restrictive=rule.action is not Action.ALLOW,
    )


def _opaque_allowed(verbs: frozenset[str] | None, tables: object, st: StatementInfo) -> bool:
    """An allow rule covers an opaque statement only when it names the statement's own opaque
    verb (CALL, DO, EXECUTE) or no verb at all, and has no table condition: allowing `SELECT`
    must not let `CALL purge_everything()` or `SELECT dblink_exec('DROP ...')` through."""
    return tables is None and (verbs is None or (st.verb in OPAQUE_VERBS and st.verb in verbs))


def _set(values: frozenset[str]) -> str:
    return "[" + ", ".join(sorted(values)) + "]"


def host_name(host: str) -> str:
    """Strip a port; keep IPv6 literals whole."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
