"""Attribute-keyed limits (`limit.key`): the loader's checks with file:line:col, and the
engine's tickets: one bucket per value the rule is about, all taken together."""

from __future__ import annotations

import textwrap

import pytest

from policies.attributes import HttpRequest, Peer
from policies.engine import Engine, merge
from policies.errors import PolicyError
from policies.limitkeys import MAX_VALUE, safe
from policies.loader import load_texts
from policies.spec import KeyAttribute, LimitKey
from policies.sql.model import StatementInfo

HEAD = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: p}
spec:
  destination: orders-db
  rules:
"""
BILLING = Peer("billing", "orders-db", "billing-1")
NOW = 1_800_000_000.0


def rules(body: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(body), "    ")


def engine(body: str) -> Engine:
    return Engine(load_texts([("f.yaml", rules(body))]))


def problems(body: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_texts([("f.yaml", rules(body))])
    return [str(p) for p in info.value.problems]


def insert(*tables: str, verbs: tuple[str, ...] = ()) -> StatementInfo:
    return StatementInfo("INSERT", frozenset({"INSERT", *verbs}), tables=tables)


def keys(e: Engine, request: StatementInfo | HttpRequest, peer: Peer = BILLING) -> list[str]:
    d = e.decide(peer, request, NOW)
    return [t.key for t in d.limits]


PER_TABLE = """\
    - name: per-table
      sql: {verbs: [INSERT], tables: [orders, order_items, "audit_*"]}
      action: limit
      limit: {rate: 50, per: 1s, scope: source-app, key: table}
"""


def test_keys_load_for_their_kind_of_request() -> None:
    (policy,) = load_texts(
        [
            (
                "f.yaml",
                rules(
                    PER_TABLE
                    + """\
    - name: per-verb
      sql: {tables: [orders]}
      action: limit
      limit: {rate: 5, key: verb}
    - name: per-tenant
      http: {paths: ["/v1/**"]}
      action: limit
      limit: {rate: 5, scope: global, key: "header:X-Tenant"}
    - name: unkeyed
      action: limit
      limit: {rate: 5}
"""
                ),
            )
        ]
    )
    got = [r.limit.key if r.limit else None for r in policy.rules]
    assert got == [
        LimitKey(KeyAttribute.TABLE),
        LimitKey(KeyAttribute.VERB),
        LimitKey(KeyAttribute.HEADER, "x-tenant"),
        None,
    ]
    assert got[2] is not None and got[2].name == "header:x-tenant"


@pytest.mark.parametrize(
    ("limit", "match", "where", "says"),
    [
        (
            "{rate: 5, key: tables}",
            "sql: {verbs: [INSERT]}",
            "f.yaml:10:29",
            "limit.key: expected one of table, verb (SQL) or method, path, host, "
            "header:<name> (HTTP), got 'tables'",
        ),
        ("{rate: 5, key: 'header:'}", "http: {methods: [GET]}", "f.yaml:10:29", "header:<name>"),
        (
            "{rate: 5, key: 'header:x tenant'}",
            "http: {methods: [GET]}",
            "f.yaml:10:29",
            "does not name a header",
        ),
        (
            "{rate: 5, key: table}",
            "http: {methods: [POST]}",
            "f.yaml:10:29",
            "limit.key: 'table' is an attribute of SQL statements; this rule matches HTTP requests",
        ),
        (
            "{rate: 5, key: path}",
            "sql: {verbs: [SELECT]}",
            "f.yaml:10:29",
            "'path' is an attribute of HTTP requests; this rule matches SQL statements",
        ),
        (
            "{rate: 5, key: [table]}",
            "sql: {verbs: [SELECT]}",
            "f.yaml:10:29",
            "limit.key: expected a string",
        ),
    ],
)
def test_bad_keys_are_errors_with_their_position(
    limit: str, match: str, where: str, says: str
) -> None:
    body = f"- name: r\n  {match}\n  action: limit\n  limit: {limit}\n"
    (problem,) = problems(body)
    assert problem.startswith(where + ": rule 'r': "), problem
    assert says in problem, problem


def test_a_key_needs_a_rule_that_matches_only_its_kind_of_request() -> None:
    (problem,) = problems("- name: r\n  action: limit\n  limit: {rate: 5, key: verb}\n")
    assert problem == (
        "f.yaml:9:29: rule 'r': limit.key: 'verb' is an attribute of SQL statements; a rule "
        "without sql: also matches HTTP requests, which have none; add a sql: condition"
    )


def test_one_ticket_per_table_the_rule_is_about() -> None:
    e = engine(PER_TABLE)
    base = "p/per-table|app=billing|table="
    assert keys(e, insert("orders")) == [base + "orders"]
    # Several tables: one ticket each, all granted or none; `staging` is not the rule's.
    d = e.decide(BILLING, insert("orders", "order_items", "staging"), NOW)
    assert [t.key for t in d.limits] == [base + "order_items", base + "orders"]
    assert [t.value for t in d.limits] == ["order_items", "orders"]
    assert {t.overflow for t in d.limits} == {"p/per-table|app=billing|table~other"}
    # Globs key by the table itself; schema and case fold to the bare relation name.
    assert keys(e, insert("audit_2026", "Audit_2025")) == [base + "audit_2025", base + "audit_2026"]
    assert keys(e, insert("sales.orders")) == [base + "orders"]
    # The scope still splits: another app, other buckets.
    other = Peer("web", "orders-db", "web-1")
    assert keys(e, insert("orders"), other) == ["p/per-table|app=web|table=orders"]


def test_without_a_tables_condition_every_table_counts_and_none_is_a_bucket() -> None:
    e = engine(
        """\
        - name: writes
          sql: {verbs: [INSERT, CALL]}
          action: limit
          limit: {rate: 5, scope: global, key: table}
        """
    )
    assert keys(e, insert("a", "b")) == ["p/writes|table=a", "p/writes|table=b"]
    call = StatementInfo("CALL", frozenset({"CALL"}), opaque=True)
    assert keys(e, call) == ["p/writes|table="]


def test_verb_key_counts_the_verbs_the_rule_names() -> None:
    e = engine(
        """\
        - name: per-verb
          sql: {verbs: [INSERT, DELETE]}
          action: limit
          limit: {rate: 5, scope: destination, key: verb}
        """
    )
    base = "p/per-verb|destination=orders-db|verb="
    both = StatementInfo("SELECT", frozenset({"SELECT", "DELETE", "INSERT"}), tables=("t",))
    assert keys(e, both) == [base + "DELETE", base + "INSERT"]  # not SELECT
    call = StatementInfo("CALL", frozenset({"CALL"}), opaque=True)
    assert keys(e, call) == [base + "CALL"]  # matched as opaque: its own verb


def test_http_keys() -> None:
    e = engine(
        """\
        - name: by-method
          http: {methods: [GET, POST]}
          action: limit
          limit: {rate: 5, scope: global, key: method}
        - name: by-path
          http: {paths: ["/v1/**"]}
          action: limit
          limit: {rate: 5, scope: global, key: path}
        - name: by-host
          http: {hosts: ["*.example.com"]}
          action: limit
          limit: {rate: 5, scope: global, key: host}
        - name: by-tenant
          http: {paths: ["/t/**"]}
          action: limit
          limit: {rate: 5, scope: global, key: "header:X-Tenant"}
        """
    )
    assert keys(e, HttpRequest("GET", "/v1/orders/7", "Api.Example.com:8443")) == [
        "p/by-method|method=GET",
        "p/by-path|path=/v1/orders/7",
        "p/by-host|host=api.example.com",
    ]
    sent_twice = (("x-tenant", "acme"), ("x-tenant", "zeta"), ("x-tenant", "acme"))
    assert keys(e, HttpRequest("PUT", "/t/1", headers=sent_twice)) == [
        "p/by-tenant|header:x-tenant=acme",
        "p/by-tenant|header:x-tenant=zeta",
    ]
    assert keys(e, HttpRequest("PUT", "/t/1")) == ["p/by-tenant|header:x-tenant="]


def test_values_are_escaped_and_bounded() -> None:
    assert safe("orders") == "orders"
    assert safe("a|b%c") == "a%7Cb%25c"  # `|` separates key parts
    assert safe("tab\there") == "tab%09here"
    assert safe("\udcff") == "%ED%B3%BF"  # a lone surrogate would make the lease API 422
    long = "/v1/" + "x" * 200
    short = safe(long)
    assert len(short) <= MAX_VALUE and short.startswith("/v1/xxx") and "~" in short
    assert safe(long + "y") != short  # still one bucket per value
    e = engine(
        """\
        - name: by-path
          http: {paths: ["/**"]}
          action: limit
          limit: {rate: 5, scope: global, key: path}
        """
    )
    assert keys(e, HttpRequest("GET", "/a|dry")) == ["p/by-path|path=/a%7Cdry"]


def test_dry_run_keyed_tickets_and_one_token_per_bucket_for_a_string() -> None:
    trial = PER_TABLE.replace("per-table", "trial") + "      enforce: false\n"
    e = engine(trial + PER_TABLE.replace("{rate: 50", "{rate: 9"))
    d = e.decide(BILLING, insert("orders", "order_items"), NOW)
    assert [t.key for t in d.dry_limits] == [
        "p/trial|app=billing|table=order_items|dry",
        "p/trial|app=billing|table=orders|dry",
    ]
    assert {t.overflow for t in d.dry_limits} == {"p/trial|app=billing|table~other|dry"}
    # Two statements of one string on the same table: one token from that table's bucket.
    both = merge([d, e.decide(BILLING, insert("orders"), NOW)])
    assert [t.key for t in both.limits] == [
        "p/per-table|app=billing|table=order_items",
        "p/per-table|app=billing|table=orders",
    ]
    assert both.to_json()["limits"] == [
        {"rule": "p/per-table", "key": t.key, "rate": 9.0, "per": 1.0} for t in both.limits
    ]


def test_a_header_key_makes_a_rule_read_headers() -> None:
    e = engine(
        """\
        - name: by-tenant
          http: {paths: ["/t/**"]}
          action: limit
          limit: {rate: 5, key: "header:x-tenant"}
        - name: by-path
          http: {paths: ["/t/**"]}
          action: limit
          limit: {rate: 5, key: path}
        - name: tenant-only
          http: {headers: {x-tenant: [acme]}}
          action: allow
        """
    )
    assert [r.rule.reads_headers for r in e.view(BILLING).rules] == [True, False, True]
