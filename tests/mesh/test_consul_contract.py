"""The Consul API contract, through py-consul: the embedded catalog of `sluice up`, or the
real agent at CONSUL_HTTP_ADDR when it is set (the same assertions; the role tests run
against the embedded catalog only, its tokens being Sluice's).

Each expectation cites the page of Consul's documentation it comes from
(developer.hashicorp.com/consul/api-docs/...). Names are unique per test, so a real
agent's other services do not matter.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import consul
import httpx
import pytest

from tests.consul_agent import Agent, agent  # noqa: F401 - the fixture

DOCS = "https://developer.hashicorp.com/consul/api-docs"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def c(agent: Agent) -> Iterator[consul.Consul]:  # noqa: F811
    client = agent.client()
    yield client
    client.http.close()


def until(fn: Callable[[], Any], timeout: float = 8.0) -> Any:
    """Poll fn() until it is truthy (checks run on their interval)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def statuses(c: consul.Consul, name: str, **kw: Any) -> dict[str, str]:
    """service ID -> the status of its own check(s), from /v1/health/service/:name."""
    _, entries = c.health.service(name, **kw)
    return {
        e["Service"]["ID"]: ",".join(ch["Status"] for ch in e["Checks"] if ch["ServiceID"])
        for e in entries
    }


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port that accepts connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def web() -> Iterator[str]:
    """An HTTP server: /ok answers 200, /busy 429, anything else 500."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = {"/ok": 200, "/busy": 429}.get(self.path, 500)
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    t.join(5)


def test_ttl_check_starts_critical_and_follows_pass_warn_fail(c: consul.Consul) -> None:
    name = unique("ttl")
    # agent/service#register-service: Check/Checks; ID defaults to Name.
    # agent/check#register-check: "Status ... the initial status"; critical by default.
    assert c.agent.service.register(name, port=7000, check=consul.Check.ttl("30s"))
    try:
        assert statuses(c, name) == {name: "critical"}
        # agent/check#ttl-check-pass|warn|fail; service check IDs are "service:<ServiceID>"
        # (agent/service#register-service, Check: "CheckID ... service:<ID>").
        assert c.agent.check.ttl_pass(f"service:{name}", "fine")
        assert statuses(c, name) == {name: "passing"}
        _, [entry] = c.health.service(name)
        [own] = [ch for ch in entry["Checks"] if ch["ServiceID"] == name]
        assert own["Output"] == "fine" and own["ServiceName"] == name and own["Type"] == "ttl"
        # health#list-service-instances-for-service: ?passing "filter results to only
        # nodes with all checks in the passing state" (warning is left out).
        assert c.agent.check.ttl_warn(f"service:{name}")
        assert statuses(c, name) == {name: "warning"}
        assert statuses(c, name, passing=True) == {}
        assert c.agent.check.ttl_fail(f"service:{name}")
        assert statuses(c, name) == {name: "critical"}
    finally:
        c.agent.service.deregister(name)


def test_ttl_check_expires_to_critical(c: consul.Consul) -> None:
    name = unique("expire")
    # agent/check#register-check, TTL: "If the check is not set to passing within the TTL,
    # it is set to critical".
    assert c.agent.service.register(name, check=consul.Check.ttl("1s"))
    try:
        c.agent.check.ttl_pass(f"service:{name}")
        assert statuses(c, name) == {name: "passing"}
        assert until(lambda: statuses(c, name) == {name: "critical"}, 5.0)
    finally:
        c.agent.service.deregister(name)


def test_tcp_and_http_checks_run_on_their_interval(
    c: consul.Consul, listener: int, web: str
) -> None:
    name = unique("probe")
    # agent/check#register-check: TCP "HOST:PORT" passes when the connection is
    # accepted; HTTP passes on 2xx, warns on 429, is critical otherwise.
    cases = {
        f"{name}-tcp-up": consul.Check.tcp("127.0.0.1", listener, "1s", timeout="1s"),
        f"{name}-tcp-down": consul.Check.tcp("127.0.0.1", 1, "1s", timeout="1s"),
        f"{name}-http-ok": consul.Check.http(f"{web}/ok", "1s", timeout="1s"),
        f"{name}-http-busy": consul.Check.http(f"{web}/busy", "1s", timeout="1s"),
        f"{name}-http-bad": consul.Check.http(f"{web}/bad", "1s", timeout="1s"),
    }
    try:
        for sid, check in cases.items():
            assert c.agent.service.register(
                name, service_id=sid, address="127.0.0.1", port=1, check=check
            )
        want = {
            f"{name}-tcp-up": "passing",
            f"{name}-tcp-down": "critical",
            f"{name}-http-ok": "passing",
            f"{name}-http-busy": "warning",
            f"{name}-http-bad": "critical",
        }
        assert until(lambda: statuses(c, name) == want), statuses(c, name)
        assert set(statuses(c, name, passing=True)) == {f"{name}-tcp-up", f"{name}-http-ok"}
    finally:
        for sid in cases:
            c.agent.service.deregister(sid)


def test_catalog_and_tag_filters(c: consul.Consul) -> None:
    name = unique("tags")
    try:
        c.agent.service.register(name, service_id=f"{name}-1", address="10.9.0.1", port=1,
                                 tags=["primary", "v1"], check=consul.Check.ttl("30s"))  # fmt: skip
        c.agent.service.register(name, service_id=f"{name}-2", port=2, tags=["replica"])
        # catalog#list-services: {name: [tags]}
        _, services = c.catalog.services()
        assert sorted(services[name]) == ["primary", "replica", "v1"]
        # catalog#list-nodes-for-service: ServiceID, ServiceName, ServiceAddress,
        # ServicePort, ServiceTags, Node, Address; ?tag filters.
        _, rows = c.catalog.service(name)
        by_id = {r["ServiceID"]: r for r in rows}
        one = by_id[f"{name}-1"]
        assert (one["ServiceName"], one["ServiceAddress"]) == (name, "10.9.0.1")
        assert one["ServicePort"] == 1
        assert one["ServiceTags"] == ["primary", "v1"] and one["Node"] and one["Address"]
        # An instance registered without Address has ServiceAddress "" (the node's applies).
        assert by_id[f"{name}-2"]["ServiceAddress"] == ""
        _, tagged = c.catalog.service(name, tag="replica")
        assert [r["ServiceID"] for r in tagged] == [f"{name}-2"]
        # health#list-service-instances-for-service: ?tag (repeatable: all must match).
        _, entries = c.health.service(name, tag=["primary", "v1"])
        assert [e["Service"]["ID"] for e in entries] == [f"{name}-1"]
        assert entries[0]["Service"]["Port"] == 1 and entries[0]["Node"]["Node"] == one["Node"]
        # An instance without checks is passing (only the node's own checks count).
        assert set(statuses(c, name, passing=True)) == {f"{name}-2"}
        # catalog#list-nodes and catalog#retrieve-map-of-services-for-a-node
        _, nodes = c.catalog.nodes()
        assert one["Node"] in [n["Node"] for n in nodes]
        _, node = c.catalog.node(one["Node"])
        assert f"{name}-1" in node["Services"]
    finally:
        c.agent.service.deregister(f"{name}-1")
        c.agent.service.deregister(f"{name}-2")


def test_deregister(c: consul.Consul) -> None:
    name = unique("gone")
    c.agent.service.register(name, check=consul.Check.ttl("30s"))
    # agent/service#deregister-service
    assert c.agent.service.deregister(name)
    _, services = c.catalog.services()
    assert name not in services
    assert c.health.service(name)[1] == []  # health: an unknown service is an empty list
    # Unknown service ID: 404 (py-consul's boolean callback: False).
    assert c.agent.service.deregister(name) is False


def test_blocking_query_returns_on_change_and_times_out(c: consul.Consul) -> None:
    name = unique("block")
    c.agent.service.register(name, check=consul.Check.ttl("30s"))
    try:
        index, _ = c.health.service(name)
        # features/blocking: with ?index the request "hangs" until a change or ?wait.
        t0 = time.monotonic()
        again, _ = c.health.service(name, index=index, wait="1s")
        took = time.monotonic() - t0
        assert again == index and 0.9 <= took < 3.0, took
        threading.Timer(0.5, lambda: c.agent.check.ttl_pass(f"service:{name}")).start()
        t0 = time.monotonic()
        new, _ = c.health.service(name, index=index, wait="10s")
        took = time.monotonic() - t0
        assert int(new) > int(index) and 0.3 < took < 5.0, took
        assert statuses(c, name) == {name: "passing"}
        # catalog/services blocks too, and wakes on a registration.
        cindex, _ = c.catalog.services()
        threading.Timer(0.3, lambda: c.agent.service.register(unique("other"))).start()
        t0 = time.monotonic()
        cnew, _ = c.catalog.services(index=cindex, wait="10s")
        assert int(cnew) > int(cindex) and time.monotonic() - t0 < 5.0
    finally:
        c.agent.service.deregister(name)
        for sid in list(c.agent.services()):
            if sid.startswith("other-"):
                c.agent.service.deregister(sid)


def test_x_consul_index_on_every_answer_including_404(agent: Agent, c: consul.Consul) -> None:  # noqa: F811
    # features/blocking: endpoints that support blocking queries return X-Consul-Index;
    # kv#read-key: "If no key exists at the given path, a 404 is returned".
    headers = {"X-Consul-Token": agent.token} if agent.token else {}
    with httpx.Client(base_url=agent.addr, headers=headers, timeout=10) as h:
        r = h.get(f"/v1/kv/{unique('missing')}")
        assert r.status_code == 404 and int(r.headers["X-Consul-Index"]) > 0
        for path in ("/v1/catalog/services", "/v1/health/service/nope", "/v1/catalog/nodes"):
            r = h.get(path)
            assert r.status_code == 200 and int(r.headers["X-Consul-Index"]) > 0, path
    index, value = c.kv.get(unique("missing"))
    assert value is None and int(index) > 0


def test_kv_recurse_cas_and_delete(c: consul.Consul) -> None:
    prefix = unique("kv") + "/"
    # kv#create-update-key: the body is the value; answers true.
    assert c.kv.put(prefix + "b", "2") is True
    assert c.kv.put(prefix + "a", b"\x00\x01", flags=42) is True
    assert c.kv.put(prefix + "sub/c", "3") is True
    # kv#read-key: ?recurse: every key with the prefix, sorted; Value is base64
    # (py-consul decodes it); CreateIndex, ModifyIndex, Flags, LockIndex.
    _, entries = c.kv.get(prefix, recurse=True)
    assert [e["Key"] for e in entries] == [prefix + "a", prefix + "b", prefix + "sub/c"]
    a = entries[0]
    assert a["Value"] == b"\x00\x01" and a["Flags"] == 42 and a["LockIndex"] == 0
    assert a["ModifyIndex"] >= a["CreateIndex"] > 0
    _, keys = c.kv.get(prefix, keys=True, separator="/")
    assert keys == [prefix + "a", prefix + "b", prefix + "sub/"]
    # ?cas=<ModifyIndex>: written only if unchanged since; cas=0: only if absent.
    _, b = c.kv.get(prefix + "b")
    assert c.kv.put(prefix + "b", "3", cas=b["ModifyIndex"]) is True
    assert c.kv.put(prefix + "b", "4", cas=b["ModifyIndex"]) is False
    assert c.kv.put(prefix + "b", "5", cas=0) is False
    _, b2 = c.kv.get(prefix + "b")
    assert b2["Value"] == b"3" and b2["ModifyIndex"] > b["ModifyIndex"]
    assert b2["CreateIndex"] == b["CreateIndex"]
    # kv#delete-key: ?recurse deletes the prefix.
    assert c.kv.delete(prefix + "a") is True
    assert [e["Key"] for e in c.kv.get(prefix, recurse=True)[1]] == [prefix + "b", prefix + "sub/c"]
    assert c.kv.delete(prefix, recurse=True) is True
    assert c.kv.get(prefix, recurse=True)[1] is None


def test_status_leader(c: consul.Consul) -> None:
    # status#get-raft-leader: "host:port" of the leader.
    leader = c.status.leader()
    host, _, port = leader.rpartition(":")
    assert host and port.isdigit()


def test_request_keys_are_case_insensitive(agent: Agent, c: consul.Consul) -> None:  # noqa: F811
    # api-docs/index "Formatted JSON Output" / agent/service: Consul decodes JSON keys
    # case-insensitively, and snake_case forms of check fields are accepted.
    name = unique("case")
    headers = {"X-Consul-Token": agent.token} if agent.token else {}
    body = {"NAME": name, "id": name, "PORT": 9, "tags": ["x"],
            "check": {"ttl": "30s", "deregister_critical_service_after": "90m"}}  # fmt: skip
    with httpx.Client(base_url=agent.addr, headers=headers, timeout=10) as h:
        assert h.put("/v1/agent/service/register", json=body).status_code == 200
        assert h.put("/v1/agent/service/register", json={"Port": 1}).status_code == 400
    try:
        _, [row] = c.catalog.service(name)
        assert (row["ServiceID"], row["ServicePort"], row["ServiceTags"]) == (name, 9, ["x"])
    finally:
        c.agent.service.deregister(name)


def test_tokens_and_roles(agent: Agent) -> None:  # noqa: F811
    """Embedded only: Sluice tokens in X-Consul-Token, with their roles (docs/api.md)."""
    if agent.embedded is None:
        pytest.skip("roles are Sluice's tokens; a real agent has its own ACLs")
    with agent.embedded.client() as admin:
        sidecar = admin.post("/v1/tokens", json={"role": "sidecar", "name": "s"}).json()["token"]
        reader = admin.post("/v1/tokens", json={"role": "reader", "name": "r"}).json()["token"]
    name = unique("roles")
    as_sidecar, as_reader = agent.client(sidecar), agent.client(reader)
    anonymous = consul.Consul(host=as_reader.http.host, port=as_reader.http.port)
    try:
        assert as_sidecar.agent.service.register(name, check=consul.Check.ttl("30s"))
        assert as_sidecar.agent.check.ttl_pass(f"service:{name}")
        assert statuses(as_reader, name) == {name: "passing"}
        with pytest.raises(consul.ACLPermissionDenied):
            as_reader.agent.service.register(unique("nope"))
        with pytest.raises(consul.ACLPermissionDenied):
            as_sidecar.kv.put(unique("k"), "v")
        with pytest.raises(consul.ACLPermissionDenied):
            anonymous.catalog.services()
        with pytest.raises(consul.ACLPermissionDenied):
            agent.client("sluice_not-a-token").catalog.services()
        assert anonymous.status.leader()  # status/*: no ACL required
    finally:
        as_sidecar.agent.service.deregister(name)
        for client in (as_sidecar, as_reader, anonymous):
            client.http.close()
