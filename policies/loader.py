"""Load policy YAML from files and directories into validated `Policy` values.

A policy set is accepted whole or not at all: every problem in every file is collected and
raised together as one `PolicyError`, each naming file:line:col and what was expected.
Unknown keys are errors, because a typo (`verb:` for `verbs:`) must never silently widen or
disable a rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from policies.errors import PolicyError, Problem
from policies.globs import NameSet, TableSet, compile_path_glob
from policies.limitkeys import parse_key
from policies.spec import (
    Action,
    HttpMatch,
    Limit,
    LimitKey,
    OnExceed,
    Policy,
    Rule,
    Scope,
    SqlMatch,
)
from policies.sql.model import VERBS
from policies.windows import Window, WindowSyntaxError, parse_day, parse_window
from policies.yamlread import Invalid, Reader, boolean, choice, mapping, number, string, strings

API_VERSION = "sluice/v1"
KINDS = ("Policy",)
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# Names end up in rule ids, audit events and SQL error text: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# A larger bucket than this is a typo, not a policy; it would also defeat float precision.
MAX_RATE = 1e9

_TOP = frozenset({"apiVersion", "kind", "metadata", "spec"})
_METADATA = frozenset({"name", "description", "labels"})
_SPEC = frozenset({"destination", "timezone", "default", "rules"})
_RULE = frozenset(
    {"name", "from", "sql", "http", "when", "action", "limit", "on_exceed", "max_delay"}
    | {"message", "enforce", "description"}
)
_SQL = frozenset({"verbs", "tables", "where"})
_HTTP = frozenset({"methods", "paths", "hosts", "headers"})
_WHEN = frozenset({"time", "days"})
_LIMIT = frozenset({"rate", "per", "burst", "scope", "key"})


def policy_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Expand files and directories (recursively, *.yaml and *.yml, sorted)."""
    files: list[Path] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
            found = [p for p in found if p.is_file()]
            if not found:
                problems.append(Problem(str(path), 1, 1, "directory holds no *.yaml or *.yml"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(str(path), 1, 1, "no such file or directory"))
    # A file named directly and again through its directory is read once.
    unique = {f.resolve(): f for f in reversed(files)}
    return [f for f in files if unique.get(f.resolve()) is f], problems


def load_paths(paths: Sequence[str | Path]) -> tuple[Policy, ...]:
    """Load and validate every policy under `paths`; raises PolicyError listing all problems."""
    files, problems = policy_files(paths)
    sources: list[tuple[str, str]] = []
    for file in files:
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(file), 1, 1, f"cannot read: {exc}"))
    try:
        policies = load_texts(sources)
    except PolicyError as exc:
        problems.extend(exc.problems)
        raise PolicyError(problems) from None
    if problems:
        raise PolicyError(problems)
    return policies


def load_texts(sources: Iterable[tuple[str, str]]) -> tuple[Policy, ...]:
    """Validate policy documents given as (file name, YAML text) pairs."""
    problems: list[Problem] = []
    policies: list[Policy] = []
    seen: dict[str, Policy] = {}
    for file, text in sources:
        reader = Reader(file)
        for doc in reader.documents(text):
            try:
                policy = _policy(reader, doc)
            except Invalid as exc:
                reader.problem(exc.node, exc.message)
                continue
            if policy is None:
                continue
            if policy.name in seen:
                first = seen[policy.name]
                reader.problem(
                    doc,
                    f"policy name {policy.name!r} is already used at {first.file}:{first.line}",
                )
                continue
            seen[policy.name] = policy
            policies.append(policy)
        problems.extend(reader.problems)
    if problems:
        raise PolicyError(problems)
    return tuple(policies)


def _policy(reader: Reader, doc: yaml.Node) -> Policy | None:
    top = mapping(doc, "policy", _TOP, frozenset({"apiVersion", "kind", "metadata", "spec"}))
    version = string(top["apiVersion"][1], "apiVersion")
    if version != API_VERSION:
        raise Invalid(top["apiVersion"][1], f"apiVersion: expected {API_VERSION!r}")
    choice(top["kind"][1], "kind", KINDS)
    meta = mapping(top["metadata"][1], "metadata", _METADATA, frozenset({"name"}))
    name = _name(meta["name"][1], "metadata.name")
    spec_node = top["spec"][1]
    spec = mapping(spec_node, "spec", _SPEC, frozenset({"destination", "rules"}))
    destination = NameSet.of([v for _, v in strings(spec["destination"][1], "spec.destination")])
    zone = _zone(spec["timezone"][1]) if "timezone" in spec else ZoneInfo("UTC")
    default = Action.ALLOW
    if "default" in spec:
        default = Action(choice(spec["default"][1], "spec.default", ("allow", "deny")))
    rules_node = spec["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode):
        raise Invalid(rules_node, "spec.rules: expected a list of rules")
    rules: list[Rule] = []
    names: dict[str, int] = {}
    before = len(reader.problems)
    for index, rule_node in enumerate(rules_node.value):
        try:
            rule = _rule(reader.file, name, index, rule_node)
        except Invalid as exc:
            reader.problem(exc.node, exc.message)
            continue
        if rule.name in names:
            reader.problem(
                rule_node,
                f"rule name {rule.name!r} is already used in policy {name!r} (line "
                f"{names[rule.name]})",
            )
            continue
        names[rule.name] = rule.line
        rules.append(rule)
    if len(reader.problems) > before:
        return None
    line = doc.start_mark.line + 1
    return Policy(name, destination, zone, default, tuple(rules), reader.file, line)


def _rule(file: str, policy: str, index: int, node: yaml.Node) -> Rule:
    what = f"rules[{index}]"
    if isinstance(node, yaml.MappingNode):  # name the rule in errors about its other keys
        for key, value in node.value:
            if key.value == "name" and isinstance(value, yaml.ScalarNode) and value.value:
                what = f"rule {value.value!r}"
    m = mapping(node, what, _RULE, frozenset({"name", "action"}))
    name = _name(m["name"][1], f"{what}.name")
    what = f"rule {name!r}"
    action = Action(choice(m["action"][1], f"{what}: action", tuple(a.value for a in Action)))
    sources = NameSet.of(["*"])
    if "from" in m:
        sources = NameSet.of([v for _, v in strings(m["from"][1], f"{what}: from")])
    if "sql" in m and "http" in m:
        raise Invalid(m["http"][0], f"{what}: a rule matches either sql or http, not both")
    sql = _sql(m["sql"][1], what) if "sql" in m else None
    http = _http(m["http"][1], what) if "http" in m else None
    window = _when(m["when"][1], what) if "when" in m else None
    limit = _limit(m, what, node) if action is Action.LIMIT else None
    if action is not Action.LIMIT:
        for key in ("limit", "on_exceed", "max_delay"):
            if key in m:
                raise Invalid(m[key][0], f"{what}: {key!r} only applies to action: limit")
    message = string(m["message"][1], f"{what}: message") if "message" in m else None
    enforce = boolean(m["enforce"][1], f"{what}: enforce") if "enforce" in m else True
    if "description" in m:
        string(m["description"][1], f"{what}: description")
    line = node.start_mark.line + 1
    return Rule(
        policy, name, index, action, sources, sql, http, window, limit, message, enforce, file, line
    )


def _sql(node: yaml.Node, what: str) -> SqlMatch:
    m = mapping(node, f"{what}: sql", _SQL)
    if not m:
        raise Invalid(node, f"{what}: sql needs at least one of verbs, tables, where")
    verbs: frozenset[str] | None = None
    if "verbs" in m:
        found = set()
        for item, verb in strings(m["verbs"][1], f"{what}: sql.verbs"):
            upper = verb.strip().upper()
            if upper not in VERBS:
                known = ", ".join(sorted(VERBS))
                raise Invalid(item, f"{what}: unknown SQL verb {verb!r}; expected one of {known}")
            found.add(upper)
        verbs = frozenset(found)
    tables = None
    if "tables" in m:
        tables = TableSet.of([v for _, v in strings(m["tables"][1], f"{what}: sql.tables")])
    where_absent = False
    if "where" in m:
        choice(m["where"][1], f"{what}: sql.where", ("absent",))
        where_absent = True
        if verbs is not None and not verbs & {"UPDATE", "DELETE"}:
            raise Invalid(m["where"][0], f"{what}: where: absent only applies to UPDATE and DELETE")
    return SqlMatch(verbs, tables, where_absent)


def _http(node: yaml.Node, what: str) -> HttpMatch:
    m = mapping(node, f"{what}: http", _HTTP)
    if not m:
        raise Invalid(node, f"{what}: http needs at least one of methods, paths, hosts, headers")
    methods = None
    if "methods" in m:
        found = set()
        for item, method in strings(m["methods"][1], f"{what}: http.methods"):
            if method.upper() not in HTTP_METHODS:
                raise Invalid(
                    item,
                    f"{what}: unknown HTTP method {method!r}; expected one of "
                    f"{', '.join(sorted(HTTP_METHODS))}",
                )
            found.add(method.upper())
        methods = frozenset(found)
    paths = None
    if "paths" in m:
        items = strings(m["paths"][1], f"{what}: http.paths")
        for item, path in items:
            try:
                compile_path_glob(path)
            except ValueError as exc:
                raise Invalid(item, f"{what}: http.paths: {exc}") from None
        paths = tuple(p for _, p in items)
    hosts = (
        NameSet.of([v for _, v in strings(m["hosts"][1], f"{what}: http.hosts")])
        if ("hosts" in m)
        else None
    )
    headers: list[tuple[str, NameSet]] = []
    if "headers" in m:
        hnode = m["headers"][1]
        if not isinstance(hnode, yaml.MappingNode) or not hnode.value:
            raise Invalid(hnode, f"{what}: http.headers: expected a mapping of name: value glob")
        seen = set()
        for key_node, value_node in hnode.value:
            key = string(key_node, f"{what}: http.headers").lower()
            if key in seen:
                raise Invalid(key_node, f"{what}: http.headers: duplicate header {key!r}")
            seen.add(key)
            values = [v for _, v in strings(value_node, f"{what}: http.headers.{key}")]
            headers.append((key, NameSet.of(values)))
    return HttpMatch(methods, paths, hosts, tuple(headers))


def _when(node: yaml.Node, what: str) -> Window:
    m = mapping(node, f"{what}: when", _WHEN, frozenset({"time"}))
    time_node = m["time"][1]
    text = string(time_node, f"{what}: when.time")
    days = None
    if "days" in m:
        days = []
        for item, day in strings(m["days"][1], f"{what}: when.days"):
            try:
                parse_day(day)
            except WindowSyntaxError as exc:
                raise Invalid(item, f"{what}: when.days: {exc}") from None
            days.append(day)
    try:
        return parse_window(text, days)
    except WindowSyntaxError as exc:
        raise Invalid(time_node, f"{what}: when.time: {exc}") from None


def _limit(m: dict[str, tuple[yaml.Node, yaml.Node]], what: str, node: yaml.Node) -> Limit:
    if "limit" not in m:
        raise Invalid(node, f"{what}: action limit needs a limit: {{rate, per, burst, scope}}")
    lm = mapping(m["limit"][1], f"{what}: limit", _LIMIT, frozenset({"rate"}))
    rate = number(lm["rate"][1], f"{what}: limit.rate")
    if not 0 < rate <= MAX_RATE:
        raise Invalid(lm["rate"][1], f"{what}: limit.rate must be a positive number")
    per = _duration(lm["per"][1], f"{what}: limit.per") if "per" in lm else 1.0
    burst = rate
    if "burst" in lm:
        burst = number(lm["burst"][1], f"{what}: limit.burst")
        if not 1 <= burst <= MAX_RATE:
            raise Invalid(lm["burst"][1], f"{what}: limit.burst must be at least 1")
    scope = Scope.SOURCE_APP
    if "scope" in lm:
        scope = Scope(choice(lm["scope"][1], f"{what}: limit.scope", tuple(s.value for s in Scope)))
    key = _limit_key(lm["key"][1], what, m) if "key" in lm else None
    on_exceed = OnExceed.REJECT
    if "on_exceed" in m:
        on_exceed = OnExceed(
            choice(m["on_exceed"][1], f"{what}: on_exceed", tuple(o.value for o in OnExceed))
        )
    max_delay = 0.0
    if "max_delay" in m:
        if on_exceed is not OnExceed.DELAY:
            raise Invalid(m["max_delay"][0], f"{what}: max_delay only applies to on_exceed: delay")
        max_delay = _duration(m["max_delay"][1], f"{what}: max_delay")
    elif on_exceed is OnExceed.DELAY:
        max_delay = 1.0
    return Limit(rate, per, burst, scope, on_exceed, max_delay, key)


def _limit_key(node: yaml.Node, what: str, m: dict[str, tuple[yaml.Node, yaml.Node]]) -> LimitKey:
    """`limit.key`, which must be an attribute of the kind of request the rule matches: a
    rule without `sql:` or `http:` matches both kinds, and half of them lack the attribute."""
    text = string(node, f"{what}: limit.key")
    try:
        key = parse_key(text)
    except ValueError as exc:
        raise Invalid(node, f"{what}: limit.key: {exc}") from None
    kind, other = ("sql", "http") if key.attribute.sql else ("http", "sql")
    if kind not in m:
        noun = {"sql": "SQL statements", "http": "HTTP requests"}
        why = (
            f"this rule matches {noun[other]}"
            if other in m
            else f"a rule without {kind}: also matches {noun[other]}, which have none; "
            f"add a {kind}: condition"
        )
        raise Invalid(
            node, f"{what}: limit.key: {key.name!r} is an attribute of {noun[kind]}; {why}"
        )
    return key


def _duration(node: yaml.Node, what: str) -> float:
    text = string(node, what)
    m = _DURATION.match(text)
    if not m:
        raise Invalid(node, f'{what}: expected a duration such as "1s", "100ms", "1m" or "1h"')
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise Invalid(node, f"{what}: must be longer than zero")
    return seconds


def _zone(node: yaml.Node) -> ZoneInfo:
    name = string(node, "spec.timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid(
            node, f"spec.timezone: unknown IANA time zone {name!r} (e.g. UTC, Europe/London)"
        ) from None


def _name(node: yaml.Node, what: str) -> str:
    value = string(node, what)
    if not _NAME.match(value):
        raise Invalid(
            node,
            f"{what}: {value!r} is not a valid name (letters, digits, '-', '_', '.'; "
            "starting with a letter or digit; at most 128 characters)",
        )
    return value
