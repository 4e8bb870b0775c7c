"""HttpDecider: decisions cached by method, host, path and only the headers rules read."""

from __future__ import annotations

import textwrap

from policies.attributes import HttpRequest, Peer
from policies.engine import Engine
from policies.http_decider import MAX_CACHED_HEADERS, HttpDecider
from policies.loader import load_texts
from policies.spec import Action

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: web}
    spec:
      destination: web
      rules:
        - name: no-debug
          http: {headers: {x-debug: ["1"]}}
          action: deny
        - name: per-tenant
          http: {paths: ["/api/**"]}
          action: limit
          limit: {rate: 5, per: 1s, key: "header:x-tenant"}
        - name: no-admin
          http: {paths: ["/admin/**"]}
          action: deny
    """
)
PEER = Peer("shop", "web", "shop-1")


def decider() -> HttpDecider:
    return HttpDecider(Engine(load_texts([("web.yaml", POLICY)])), PEER)


def test_header_names_are_those_rules_read() -> None:
    assert decider().header_names == frozenset({"x-debug", "x-tenant"})
    assert decider().header_names_b == frozenset({b"x-debug", b"x-tenant"})


def test_cached_decisions_follow_the_header_values() -> None:
    d = decider()
    assert d.decide("GET", "web", "/", 0.0, (("x-debug", "1"),)).applied is Action.DENY
    assert d.decide("GET", "web", "/", 0.0).applied is Action.ALLOW
    assert d.decide("GET", "web", "/", 0.0, (("x-debug", "0"),)).applied is Action.ALLOW
    assert d.decide("GET", "web", "/", 0.0, (("x-debug", "1"),)).applied is Action.DENY
    assert (d.hits, d.misses) == (1, 3)


def test_limit_key_from_a_header_is_in_the_cache_key() -> None:
    d = decider()
    a = d.decide("GET", "web", "/api/x", 0.0, (("x-tenant", "a"),))
    b = d.decide("GET", "web", "/api/x", 0.0, (("x-tenant", "b"),))
    assert a.limits[0].key != b.limits[0].key
    assert d.decide("GET", "web", "/api/x", 0.0, (("x-tenant", "a"),)).limits == a.limits


def test_same_decision_as_the_engine_with_all_headers() -> None:
    d = decider()
    everything = (("x-debug", "1"), ("user-agent", "curl"), ("accept", "*/*"))
    read = tuple(h for h in everything if h[0] in d.header_names)
    direct = d.engine.decide(PEER, HttpRequest("GET", "/x", "web", everything), 0.0)
    assert d.decide("GET", "web", "/x", 0.0, read) == direct


def test_long_header_values_are_decided_but_not_cached() -> None:
    d = decider()
    long = (("x-tenant", "t" * (MAX_CACHED_HEADERS + 1)),)
    d.decide("GET", "web", "/api/x", 0.0, long)
    d.decide("GET", "web", "/api/x", 0.0, long)
    assert (d.hits, d.misses) == (0, 2)
