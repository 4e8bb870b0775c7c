"""Decision semantics: deny overrides, limits, defaults, dry runs, opaque and unparseable SQL."""

from __future__ import annotations

import textwrap
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.attributes import HttpRequest, Peer
from policies.engine import Engine, merge
from policies.explain import explain
from policies.loader import load_texts
from policies.spec import Action
from policies.sql.model import StatementInfo, parse_error


def engine(*docs: str) -> Engine:
    return Engine(load_texts([(f"p{i}.yaml", textwrap.dedent(d)) for i, d in enumerate(docs)]))


def sql(
    verb: str,
    *more: str,
    tables: tuple[str, ...] = (),
    no_where: bool = False,
    opaque: bool = False,
) -> StatementInfo:
    return StatementInfo(
        verb=verb, verbs=frozenset({verb, *more}), tables=tables, no_where=no_where, opaque=opaque
    )


def at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


NOON = at("2026-11-24T12:00:00+00:00")
GUARD = """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: orders-db
      timezone: Europe/London
      rules:
        - name: night-freeze
          sql: {verbs: [DROP, DELETE, TRUNCATE]}
          when: {time: "01:00-03:00"}
          action: deny
          message: frozen at night
        - name: billing-inserts
          from: [billing]
          sql: {verbs: [INSERT], tables: [orders]}
          action: limit
          limit: {rate: 200, per: 1s, burst: 50, scope: source-app}
        - name: bounded-writes
          sql: {verbs: [UPDATE, DELETE], where: absent}
          action: deny
        - name: audit-grants
          sql: {verbs: [GRANT]}
          action: audit
        - name: no-payroll
          from: [reporting]
          sql: {tables: [hr.payroll]}
          action: deny
    """
BILLING = Peer("billing", "orders-db", "billing-1")


def test_time_window_deny_only_inside_window() -> None:
    e = engine(GUARD)
    delete = sql("DELETE", tables=("orders",))
    inside = e.decide(BILLING, delete, at("2026-11-24T01:30:00+00:00"))
    assert (inside.action, inside.enforced, inside.rule) == (
        Action.DENY,
        True,
        "guard/night-freeze",
    )
    assert inside.message == "frozen at night" and inside.policy == "guard"
    outside = e.decide(BILLING, delete, NOON)
    assert outside.action is Action.ALLOW and outside.rules == ()


def test_deny_overrides_limit_and_all_matches_are_reported() -> None:
    e = engine(GUARD)
    d = e.decide(BILLING, sql("DELETE", "INSERT", tables=("orders",), no_where=True), NOON)
    assert d.action is Action.DENY and d.rule == "guard/bounded-writes"
    assert d.rules == ("guard/billing-inserts", "guard/bounded-writes")
    assert d.limits == ()


def test_limit_tickets_carry_the_scope_key() -> None:
    e = engine(GUARD)
    d = e.decide(BILLING, sql("INSERT", tables=("public.orders",)), NOON)
    assert d.action is Action.LIMIT and d.applied is Action.LIMIT
    (ticket,) = d.limits
    assert ticket.key == "guard/billing-inserts|app=billing" and ticket.limit.burst == 50
    other = e.decide(Peer("web", "orders-db"), sql("INSERT", tables=("orders",)), NOON)
    assert other.action is Action.ALLOW  # the limit is only for billing


DRY_LIMIT = """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: trial}
    spec:
      destination: orders-db
      rules:
        - name: hard
          sql: {verbs: [UPDATE]}
          action: limit
          limit: {rate: 5, per: 1s, scope: source-app}
        - name: soft
          sql: {verbs: [INSERT, UPDATE]}
          action: limit
          limit: {rate: 2, per: 1s, scope: source-app}
          enforce: false
        - name: no-drop
          sql: {verbs: [DROP]}
          action: deny
    """


def test_dry_run_limits_hand_over_their_own_tickets() -> None:
    e = engine(DRY_LIMIT)
    d = e.decide(BILLING, sql("INSERT"), NOON)
    assert (d.action, d.applied, d.enforced) == (Action.LIMIT, Action.ALLOW, False)
    assert d.limits == ()
    (dry,) = d.dry_limits
    assert dry.rule_id == "trial/soft" and dry.key == "trial/soft|app=billing|dry"
    # Beside an enforcing limit: each in its own field, the dry bucket apart.
    both = e.decide(BILLING, sql("UPDATE"), NOON)
    assert [t.key for t in both.limits] == ["trial/hard|app=billing"]
    assert [t.key for t in both.dry_limits] == ["trial/soft|app=billing|dry"]
    assert both.to_json()["dry_limits"] == [
        {"rule": "trial/soft", "key": "trial/soft|app=billing|dry", "rate": 2.0, "per": 1.0}
    ]
    # Nothing to check when the statement is denied, or when no dry limit matched.
    assert merge([d, e.decide(BILLING, sql("DROP"), NOON)]).dry_limits == ()
    assert merge([d, both]).dry_limits == (dry,)  # one token per key for the string
    assert e.decide(BILLING, sql("SELECT"), NOON).dry_limits == ()


def test_audit_rule_flags_without_changing_outcome() -> None:
    d = engine(GUARD).decide(BILLING, sql("GRANT"), NOON)
    assert d.action is Action.ALLOW and d.audit and d.rules == ("guard/audit-grants",)


def test_qualified_table_patterns() -> None:
    e = engine(GUARD)
    reporting = Peer("reporting", "orders-db")
    for tables in (("hr.payroll",), ("payroll",), ("x", "HR.PAYROLL")):
        assert e.decide(reporting, sql("SELECT", tables=tables), NOON).action is Action.DENY, tables
    assert (
        e.decide(reporting, sql("SELECT", tables=("sales.payroll",)), NOON).action is Action.ALLOW
    )
    assert e.decide(reporting, sql("SELECT"), NOON).action is Action.ALLOW


DEFAULT_DENY = """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: ro}
    spec:
      destination: "analytics-*"
      default: deny
      rules:
        - name: reads
          sql: {verbs: [SELECT]}
          action: allow
        - name: procs
          from: [etl]
          sql: {verbs: [CALL]}
          action: allow
        - name: no-drop
          sql: {verbs: [DROP]}
          action: deny
          enforce: false
    """


def test_default_deny_and_allow_rules() -> None:
    e = engine(DEFAULT_DENY)
    peer = Peer("web", "analytics-eu")
    assert e.decide(peer, sql("SELECT"), NOON).action is Action.ALLOW
    d = e.decide(peer, sql("INSERT"), NOON)
    assert d.action is Action.DENY and d.rule is None and "default deny" in d.reason
    assert e.decide(Peer("web", "orders-db"), sql("INSERT"), NOON).reason.startswith("no policy")


def test_opaque_statement_matches_restrictive_rules_but_not_unrelated_allows() -> None:
    e = engine(DEFAULT_DENY, GUARD)
    call = sql("CALL", opaque=True)
    # An allow rule for SELECT must not let `CALL purge()` through a default-deny policy.
    assert e.decide(Peer("web", "analytics-eu"), call, NOON).applied is Action.DENY
    # An allow rule that names CALL does.
    assert e.decide(Peer("etl", "analytics-eu"), call, NOON).applied is Action.ALLOW
    # A deny rule on DROP stops an opaque statement while the rule is active...
    night = e.decide(BILLING, call, at("2026-11-24T01:30:00+00:00"))
    assert night.applied is Action.DENY and night.rule == "guard/night-freeze"
    # ...and a dry-run deny on DROP reports it would have.
    d = e.decide(Peer("etl", "analytics-eu"), call, NOON)
    assert d.rules == ("ro/procs", "ro/no-drop") and d.action is Action.DENY and not d.enforced


def test_dry_run_is_decided_reported_but_not_applied() -> None:
    d = engine(DEFAULT_DENY).decide(Peer("web", "analytics-1"), sql("DROP"), NOON)
    assert (d.action, d.applied, d.enforced) == (Action.DENY, Action.DENY, True)  # default deny
    d = engine(DEFAULT_DENY).decide(Peer("web", "analytics-1"), sql("SELECT", "DROP"), NOON)
    assert (d.action, d.applied, d.enforced) == (Action.DENY, Action.ALLOW, False)
    assert d.rule == "ro/no-drop" and d.rules == ("ro/reads", "ro/no-drop")


def test_unparseable_statement_denied_only_where_deny_rules_exist() -> None:
    bad = parse_error('syntax error at or near "DELEET"')
    d = engine(GUARD).decide(BILLING, bad, NOON)
    assert d.applied is Action.DENY and "does not parse" in d.reason and d.policy == "guard"
    open_policy = """\
        apiVersion: sluice/v1
        kind: Policy
        metadata: {name: open}
        spec:
          destination: orders-db
          rules: [{name: a, sql: {verbs: [GRANT]}, action: audit}]
        """
    assert engine(open_policy).decide(BILLING, bad, NOON).applied is Action.ALLOW


def test_any_default_deny_wins_across_policies() -> None:
    other = """\
        apiVersion: sluice/v1
        kind: Policy
        metadata: {name: also}
        spec: {destination: "*", rules: []}
        """
    e = engine(other, DEFAULT_DENY)
    assert e.decide(Peer("x", "analytics-2"), sql("INSERT"), NOON).applied is Action.DENY
    assert e.decide(Peer("x", "orders-db"), sql("INSERT"), NOON).applied is Action.ALLOW


def test_multi_statement_the_most_severe_decides() -> None:
    e = engine(GUARD)
    d = e.decide_all(BILLING, [sql("SELECT"), sql("UPDATE", no_where=True), sql("GRANT")], NOON)
    assert d.applied is Action.DENY and d.rule == "guard/bounded-writes" and d.audit


HTTP = """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: pay}
    spec:
      destination: payments
      rules:
        - name: reporting-read-only
          from: [reporting]
          http: {methods: [POST, PUT, PATCH, DELETE], paths: ["/v1/payments/**"]}
          action: deny
        - name: admin-host
          http: {hosts: ["admin.*"], headers: {x-role: ["admin", "root"]}}
          action: allow
        - name: admin-host-deny
          http: {hosts: ["admin.*"]}
          action: deny
    """


@pytest.mark.parametrize(
    ("source", "method", "path", "host", "headers", "action"),
    [
        ("reporting", "POST", "/v1/payments", "", (), Action.DENY),
        ("reporting", "POST", "/v1/payments/1/refund", "", (), Action.DENY),
        ("reporting", "GET", "/v1/payments/1", "", (), Action.ALLOW),
        ("reporting", "POST", "/v1/paymentsX", "", (), Action.ALLOW),
        ("billing", "POST", "/v1/payments/1", "", (), Action.ALLOW),
        ("x", "GET", "/", "admin.example:8080", (("x-role", "admin"),), Action.DENY),
        ("x", "GET", "/", "admin.example", (("x-role", "guest"),), Action.DENY),
        ("x", "GET", "/", "www.example", (), Action.ALLOW),
    ],
)
def test_http_rules(
    source: str,
    method: str,
    path: str,
    host: str,
    headers: tuple[tuple[str, str], ...],
    action: Action,
) -> None:
    d = engine(HTTP).decide(
        Peer(source, "payments"), HttpRequest(method, path, host, headers), NOON
    )
    assert d.applied is action, d


def test_sql_rules_do_not_match_http_and_back() -> None:
    e = engine(GUARD, HTTP)
    assert e.decide(BILLING, HttpRequest("DELETE", "/x"), NOON).rules == ()
    assert e.decide(Peer("reporting", "payments"), sql("DELETE", no_where=True), NOON).rules == ()


def test_index_keeps_unrelated_rules_out_of_candidates() -> None:
    docs = [
        f"""\
        apiVersion: sluice/v1
        kind: Policy
        metadata: {{name: p{i}}}
        spec:
          destination: db-{i}
          rules:
            - {{name: r, from: [app-{i}], sql: {{verbs: [DELETE]}}, action: deny}}
            - {{name: s, sql: {{verbs: [SELECT]}}, action: audit}}
        """
        for i in range(300)
    ]
    e = engine(*docs)
    view = e.view(Peer("app-7", "db-7"))
    assert len(view.rules) == 2
    assert [r.id for r in view.by_verb["DELETE"]] == ["p7/r"]
    assert view.by_verb["INSERT"] == ()
    assert e.decide(Peer("app-7", "db-7"), sql("DELETE"), NOON).applied is Action.DENY
    assert e.decide(Peer("app-8", "db-7"), sql("DELETE"), NOON).applied is Action.ALLOW


# The fast path (indexed candidates, matches_*) and the explaining slow path (every rule,
# why_not) are written separately; they must agree on which rules match.
VERB_POOL = ["SELECT", "INSERT", "UPDATE", "DELETE", "DROP", "CALL", "GRANT", "TRUNCATE"]
statements = st.builds(
    lambda verbs, tables, no_where, opaque, err: (
        parse_error("x")
        if err
        else StatementInfo(
            verb=verbs[0],
            verbs=frozenset(verbs),
            tables=tuple(tables),
            no_where=no_where,
            opaque=opaque,
        )
    ),
    st.lists(st.sampled_from(VERB_POOL), min_size=1, max_size=3),
    st.lists(
        st.sampled_from(["orders", "public.orders", "hr.payroll", "payroll", "x"]), max_size=2
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)


_MIXED = engine(GUARD, DEFAULT_DENY, HTTP)


@settings(max_examples=300, deadline=None)
@given(
    statements,
    st.sampled_from(["billing", "reporting", "web", "etl"]),
    st.sampled_from(["orders-db", "analytics-eu", "payments"]),
    st.integers(min_value=0, max_value=7 * 24 * 60),
)
def test_engine_agrees_with_explain(
    stmt: StatementInfo, source: str, dest: str, minute: int
) -> None:
    e = _MIXED
    now = at("2026-11-23T00:00:00+00:00") + minute * 60
    ex = explain(e, Peer(source, dest), stmt, now)
    assert ex.decision.rules == tuple(v.id for v in ex.verdicts if v.matched)


def test_allow_select_does_not_cover_an_opaque_select() -> None:
    # `SELECT dblink_exec('DROP TABLE t')` is a SELECT the inspector cannot see into.
    hidden = StatementInfo(verb="SELECT", verbs=frozenset({"SELECT"}), opaque=True)
    d = engine(DEFAULT_DENY).decide(Peer("web", "analytics-eu"), hidden, NOON)
    assert d.applied is Action.DENY


# Rules whose tables are literal names are indexed by table; globs are not. Every mix of
# patterns and references must still find exactly the rules the slow path says match.
TABLE_PATTERNS = ["orders", "public.orders", "Orders", "hr.payroll", "pay*", "*.orders", "x"]
TABLE_REFS = ["orders", "public.orders", "ORDERS", "hr.payroll", "payroll", "sales.orders", "y"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(TABLE_PATTERNS), min_size=1, max_size=3, unique=True),
            st.sampled_from(["DELETE", "SELECT"]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.sampled_from(TABLE_REFS), max_size=3, unique=True),
    st.sets(st.sampled_from(["DELETE", "SELECT"]), min_size=1),
)
def test_table_index_agrees_with_explain(
    rules: list[tuple[list[str], str]], refs: list[str], verbs: set[str]
) -> None:
    body = "\n".join(
        f"    - {{name: r{i}, sql: {{verbs: [{verb}], tables: {tables!r}}}, action: audit}}"
        for i, (tables, verb) in enumerate(rules)
    )
    e = Engine(
        load_texts(
            [
                (
                    "t.yaml",
                    f"apiVersion: sluice/v1\nkind: Policy\nmetadata: {{name: t}}\nspec:\n  destination: db\n  rules:\n{body}\n",
                )
            ]
        )
    )
    stmt = StatementInfo(verb=sorted(verbs)[0], verbs=frozenset(verbs), tables=tuple(refs))
    ex = explain(e, Peer("app", "db"), stmt, NOON)
    assert ex.decision.rules == tuple(v.id for v in ex.verdicts if v.matched)


def test_rules_on_other_tables_are_not_candidates() -> None:
    body = "\n".join(
        f"    - {{name: r{i}, sql: {{verbs: [DELETE], tables: [t{i}]}}, action: deny}}"
        for i in range(500)
    )
    e = Engine(
        load_texts(
            [
                (
                    "t.yaml",
                    f"apiVersion: sluice/v1\nkind: Policy\nmetadata: {{name: t}}\nspec:\n  destination: db\n  rules:\n{body}\n",
                )
            ]
        )
    )
    view = e.view(Peer("app", "db"))
    candidates = view.sql_candidates(sql("DELETE", tables=("s.T7",)))
    assert [r.id for r in candidates] == ["t/r7"]
    assert e.decide(Peer("app", "db"), sql("DELETE", tables=("t7",)), NOON).rules == ("t/r7",)
    assert e.decide(Peer("app", "db"), sql("DELETE", tables=("t9999",)), NOON).rules == ()
