"""The catalog providers: the YAML file (validation, reload, fail static) and Consul's JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshdns.catalog import CatalogError, Instance, StaticCatalog, parse_catalog
from meshdns.consul_catalog import ConsulCatalog, health_of, instances_from_health
from tests.consul_agent import Agent, agent, agent_env  # noqa: F401 - fixtures


def test_file_catalog(catalog: StaticCatalog) -> None:
    assert catalog.datacenter == "dc1" and catalog.index == 1
    assert catalog.services() == ["down", "orders-db", "v6only", "web"]
    [db] = catalog.instances("orders-db") or []
    assert db == Instance(
        "orders-db", "10.0.0.1", 5432, "node-a", "10.0.0.1", frozenset({"primary"})
    )
    assert catalog.instances("nope") is None
    assert catalog.node("node-b") is not None and catalog.node("nope") is None


def test_a_node_not_listed_takes_its_first_instance_address() -> None:
    data = parse_catalog({"services": {"api": [{"address": "10.9.0.1", "port": 1}]}})
    assert data.nodes["local"].address == "10.9.0.1"


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ([], "expected a mapping"),
        ({"servics": {}}, "unknown key(s) servics"),
        ({"services": {"a.b": []}}, "is not a DNS label"),
        ({"services": {"a": {}}}, "expected a list of instances"),
        ({"services": {"a": [{"port": 1}]}}, "no address, and node 'local'"),
        ({"services": {"a": [{"address": "x", "port": 70000}]}}, "port: expected 0-65535"),
        ({"services": {"a": [{"address": "x", "health": "ok"}]}}, "health: expected one of"),
        ({"services": {"a": [{"address": "x", "tags": "v1"}]}}, "tags: expected a list"),
        ({"services": {"a": [{"address": "x", "weight": 1}]}}, "unknown key(s) weight"),
        ({"services": {"a": [{"address": "x", "meta": {"k": 1}}]}}, "meta: expected a mapping"),
        ({"nodes": ["n"]}, "nodes: expected a mapping"),
    ],
)
def test_bad_catalogs_name_the_problem(doc: object, error: str) -> None:
    with pytest.raises(CatalogError, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_catalog(doc, "f.yaml")


def test_reload_on_change_and_keep_the_last_good_on_a_bad_edit(catalog_file: Path) -> None:
    catalog = StaticCatalog(catalog_file)
    catalog.poll()
    assert catalog.index == 1  # unchanged file: nothing reloaded
    catalog_file.write_text("services: {api: [{address: 10.0.0.5, port: 80}]}\n")
    catalog.poll()
    assert catalog.index == 2 and catalog.services() == ["api"]
    catalog_file.write_text("services: [oops")
    catalog.poll()
    assert catalog.index == 2 and catalog.services() == ["api"] and catalog.last_error
    catalog_file.unlink()
    catalog.poll()
    assert catalog.services() == ["api"]


def test_a_bad_file_at_start_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("services: {a: 1}\n")
    with pytest.raises(CatalogError, match=r"c\.yaml: services: a: expected a list"):
        StaticCatalog(tmp_path / "c.yaml")
    with pytest.raises(OSError):
        StaticCatalog(tmp_path / "missing.yaml")


# The shape of one entry of GET /v1/health/service/:service, as Consul documents it
# (developer.hashicorp.com/consul/api-docs/health#sample-response-2), trimmed.
HEALTH_ENTRY = {
    "Node": {"ID": "40e4a748", "Node": "foobar", "Address": "10.1.10.12", "Datacenter": "dc1"},
    "Service": {
        "ID": "redis",
        "Service": "redis",
        "Tags": ["primary"],
        "Address": "10.1.10.12",
        "Port": 8000,
        "Meta": {"redis_version": "4.0"},
    },
    "Checks": [
        {"Node": "foobar", "CheckID": "service:redis", "Status": "passing", "ServiceID": "redis"},
        {"Node": "foobar", "CheckID": "serfHealth", "Status": "passing", "ServiceID": ""},
    ],
}


def test_consul_health_entries_become_instances() -> None:
    entry = dict(HEALTH_ENTRY, Service=dict(HEALTH_ENTRY["Service"], Address=""))
    [i] = instances_from_health("redis", [entry])
    assert i == Instance(
        "redis",
        "10.1.10.12",
        8000,
        "foobar",
        "10.1.10.12",
        frozenset({"primary"}),
        meta={"redis_version": "4.0"},
    )
    assert health_of([{"Status": "passing"}, {"Status": "warning"}]) == "warning"
    assert health_of([{"Status": "warning"}, {"Status": "critical"}]) == "critical"
    assert health_of([]) == "passing"


def test_against_a_live_consul_agent(agent_env: Agent) -> None:  # noqa: F811
    """The agent at CONSUL_HTTP_ADDR if set, else `sluice up`'s embedded catalog
    (tests/consul_agent.py sets CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN for it)."""
    import consul

    client = consul.Consul()
    try:
        client.agent.service.register(
            "meshdns-test", service_id="meshdns-test-1", address="10.3.0.1", port=7000, tags=["t1"]
        )
        catalog = ConsulCatalog()
        try:
            assert catalog.wait_synced(10)
            got = None
            for _ in range(100):
                got = catalog.instances("meshdns-test")
                if got:
                    break
                catalog._stop.wait(0.1)
            assert (
                got and got[0].address == "10.3.0.1" and got[0].port == 7000 and "t1" in got[0].tags
            )
        finally:
            catalog.close()
    finally:
        client.agent.service.deregister("meshdns-test-1")
        client.http.close()
