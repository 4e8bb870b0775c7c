"""Consul DNS semantics, sans-I/O: whole query packets into `Answerer.handle`, whole answers out."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from meshdns.answer import Answerer, Forward, Vip
from meshdns.catalog import StaticCatalog
from meshdns.wire import read_question

from .conftest import many


def ask(
    a: Answerer, name: str, qtype: str = "A", *, edns: int | None = None, tcp: bool = False
) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    out = a.handle(q.pack(), tcp=tcp)
    assert isinstance(out, bytes), out
    r = DNSRecord.parse(out)
    assert r.header.id == q.header.id and r.header.qr == 1
    return r


def rdata(r: DNSRecord, section: str = "rr") -> list[str]:
    return sorted(str(x.rdata) for x in getattr(r, section))


def rcode(r: DNSRecord) -> str:
    return str(RCODE[r.header.rcode])


@pytest.fixture
def a(catalog: StaticCatalog) -> Answerer:
    return Answerer(catalog, rng=random.Random(7))


def test_service_a_records_are_the_healthy_instances(a: Answerer) -> None:
    r = ask(a, "web.service.consul")
    assert rcode(r) == "NOERROR" and r.header.aa == 1 and r.header.ra == 0
    assert rdata(r) == ["10.0.0.11", "10.0.0.12"]  # passing + warning; critical left out
    assert {x.ttl for x in r.rr} == {0}
    assert not r.auth


def test_only_passing_leaves_out_warning(catalog: StaticCatalog) -> None:
    assert rdata(ask(Answerer(catalog, only_passing=True), "web.service.consul")) == ["10.0.0.11"]


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("v1.web.service.consul", ["10.0.0.11"]),
        ("blue.web.service.consul", ["10.0.0.11"]),
        ("V2.Web.Service.Consul", ["10.0.0.12"]),
        ("web.service.dc1.consul", ["10.0.0.11", "10.0.0.12"]),
        ("v1.web.service.dc1.consul", ["10.0.0.11"]),
        ("orders-db.service.consul", ["10.0.0.1"]),  # no service address: the node's
        ("node-a.node.consul", ["10.0.0.1"]),
        ("node-b.node.dc1.consul", ["10.0.0.2"]),
        ("0a00000b.addr.consul", ["10.0.0.11"]),
        ("0a00000b.addr.dc1.consul", ["10.0.0.11"]),
    ],
)
def test_names(a: Answerer, name: str, want: list[str]) -> None:
    r = ask(a, name)
    assert rcode(r) == "NOERROR" and rdata(r) == want


@pytest.mark.parametrize(
    "name",
    [
        "nosuch.service.consul",
        "v3.web.service.consul",  # no instance has the tag
        "v1.web.service.dc2.consul",  # another datacenter
        "down.service.consul",  # only critical instances: NXDOMAIN, like Consul
        "nosuch.node.consul",
        "a.b.web.service.consul",
        "web.consul",
        "zz.addr.consul",
        "service.consul",
    ],
)
def test_nxdomain_carries_the_soa(a: Answerer, name: str) -> None:
    r = ask(a, name)
    assert rcode(r) == "NXDOMAIN" and not r.rr and r.header.aa == 1
    [soa] = r.auth
    assert soa.rtype == QTYPE.SOA and str(soa.rname) == "consul."
    assert str(soa.rdata).startswith("ns.consul. hostmaster.consul. 1 3600 600 86400 0")


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("web.service.consul", "MX"),
        ("web.service.consul", "AAAA"),  # only IPv4 instances
        ("v6only.service.consul", "A"),
        ("node-a.node.consul", "AAAA"),
        ("consul", "A"),
    ],
)
def test_nodata_carries_the_soa(a: Answerer, name: str, qtype: str) -> None:
    r = ask(a, name, qtype)
    assert rcode(r) == "NOERROR" and not r.rr
    assert [x.rtype for x in r.auth] == [QTYPE.SOA]


def test_aaaa_and_any(a: Answerer) -> None:
    assert rdata(ask(a, "v6only.service.consul", "AAAA")) == ["fd00::7"]
    assert rdata(ask(a, "v6only.service.consul", "ANY")) == ["fd00::7"]
    assert rdata(ask(a, "web.service.consul", "ANY")) == ["10.0.0.11", "10.0.0.12"]


def test_srv_with_addresses_in_the_additional_section(a: Answerer) -> None:
    r = ask(a, "web.service.consul", "SRV")
    assert rdata(r) == ["1 1 8080 0a00000b.addr.dc1.consul.", "1 1 8081 0a00000c.addr.dc1.consul."]
    assert sorted((str(x.rname), str(x.rdata)) for x in r.ar) == [
        ("0a00000b.addr.dc1.consul.", "10.0.0.11"),
        ("0a00000c.addr.dc1.consul.", "10.0.0.12"),
    ]
    r = ask(a, "orders-db.service.consul", "SRV")  # service address = node address
    assert rdata(r) == ["1 1 5432 node-a.node.dc1.consul."]
    assert [(str(x.rname), str(x.rdata)) for x in r.ar] == [("node-a.node.dc1.consul.", "10.0.0.1")]
    r = ask(a, "v6only.service.consul", "SRV")
    assert [QTYPE[x.rtype] for x in r.ar] == ["AAAA"]


@pytest.mark.parametrize(
    ("name", "ports"),
    [
        ("_web._v1.service.consul", [8080]),
        ("_web._v2.service.consul", [8081]),
        ("_web._tcp.service.consul", [8080, 8081]),  # `_tcp`: no tag filter (Consul's rule)
        ("_web._v1.service.dc1.consul", [8080]),
        ("_orders-db._primary.service.consul", [5432]),
    ],
)
def test_rfc2782_srv(a: Answerer, name: str, ports: list[int]) -> None:
    r = ask(a, name, "SRV")
    assert sorted(x.rdata.port for x in r.rr) == ports
    assert len(r.ar) == len(ports)


def test_apex_soa_and_ns(a: Answerer) -> None:
    r = ask(a, "consul", "SOA")
    assert [QTYPE[x.rtype] for x in r.rr] == ["SOA"] and not r.auth
    assert rdata(ask(a, "consul.", "NS")) == ["ns.consul."]


def test_ttl_and_domain_are_configurable(catalog: StaticCatalog) -> None:
    a = Answerer(catalog, domain="mesh.internal.", ttl=30)
    r = ask(a, "web.service.mesh.internal")
    assert rdata(r) == ["10.0.0.11", "10.0.0.12"] and {x.ttl for x in r.rr} == {30}
    assert str(ask(a, "nope.service.mesh.internal").auth[0].rname) == "mesh.internal."
    assert rcode(ask(a, "web.service.consul")) == "REFUSED"  # not ours, no recursors


def test_outside_names_are_forwarded_when_recursors_exist(catalog: StaticCatalog) -> None:
    a = Answerer(catalog, recursion=True)
    q = DNSRecord.question("example.com", "A")
    out = a.handle(q.pack())
    assert isinstance(out, Forward) and out.data == q.pack()
    r = DNSRecord.parse(a.servfail(out))
    assert rcode(r) == "SERVFAIL" and r.header.id == q.header.id and r.header.ra == 1
    assert str(r.q.qname) == "example.com." and r.header.rd == 1
    assert ask(a, "web.service.consul").header.ra == 1


def test_answers_are_shuffled_and_cached(catalog_file: Path) -> None:
    catalog_file.write_text(many(6))
    a = Answerer(StaticCatalog(catalog_file))
    orders = {tuple(str(x.rdata) for x in ask(a, "big.service.consul").rr) for _ in range(20)}
    assert len(orders) > 1 and len({frozenset(o) for o in orders}) == 1
    assert a.stats.cache_misses == 1 and a.stats.cache_hits == 19


def test_a_catalog_change_rebuilds_the_answer(catalog_file: Path) -> None:
    catalog = StaticCatalog(catalog_file)
    a = Answerer(catalog)
    assert rdata(ask(a, "v1.web.service.consul")) == ["10.0.0.11"]
    catalog_file.write_text(catalog_file.read_text().replace("health: critical}", "}", 1))
    catalog.poll()
    assert rdata(ask(a, "v1.web.service.consul")) == ["10.0.0.11", "10.0.0.13"]
    assert a.stats.cache_misses == 2


def test_a_change_to_another_service_keeps_the_answer(catalog_file: Path) -> None:
    catalog = StaticCatalog(catalog_file)
    a = Answerer(catalog)
    web = ask(a, "web.service.consul", "SRV")
    assert rdata(ask(a, "orders-db.service.consul")) == ["10.0.0.1"]
    catalog_file.write_text(catalog_file.read_text().replace("port: 5432", "port: 5433"))
    catalog.poll()
    # web's instances are as they were: its packed answer stands, checked not rebuilt.
    assert rdata(ask(a, "web.service.consul", "SRV")) == rdata(web)
    assert (a.stats.cache_misses, a.stats.cache_revalidated) == (2, 1)
    assert rdata(ask(a, "orders-db.service.consul", "SRV")) == ["1 1 5433 node-a.node.dc1.consul."]
    assert ask(a, "web.service.consul", "SRV") and a.stats.cache_revalidated == 1  # a plain hit


def test_the_question_keeps_the_clients_case(a: Answerer) -> None:
    q = DNSRecord.question("wEb.SeRvIcE.cOnSuL", "A")
    data = q.pack()
    out = a.handle(data)
    assert isinstance(out, bytes) and out[12 : len(data)] == data[12:]
    a.handle(DNSRecord.question("WEB.service.consul").pack())
    assert a.stats.cache_hits == 1


def test_udp_answers_are_trimmed_with_tc_and_tcp_gets_all(catalog_file: Path) -> None:
    catalog_file.write_text(many(200))
    a = Answerer(StaticCatalog(catalog_file))
    small = ask(a, "big.service.consul")
    assert small.header.tc == 1 and 0 < len(small.rr) < 200 and len(small.pack()) <= 512
    edns = ask(a, "big.service.consul", edns=1232)
    assert edns.header.tc == 1 and len(small.rr) < len(edns.rr) < 200 and len(edns.pack()) <= 1232
    assert [x.rtype for x in edns.ar] == [QTYPE.OPT]
    full = ask(a, "big.service.consul", tcp=True)
    assert full.header.tc == 0 and len(full.rr) == 200
    srv = ask(a, "big.service.consul", "SRV")
    assert srv.header.tc == 1 and len(srv.rr) == len(srv.ar) > 0  # every SRV keeps its address
    assert a.stats.truncated == 3


def test_edns_is_echoed_only_when_asked(a: Answerer) -> None:
    assert ask(a, "web.service.consul", edns=4096).ar[0].rclass == 4096
    assert not ask(a, "web.service.consul").ar


def test_edns_version_1_gets_badvers(a: Answerer) -> None:
    q = DNSRecord.question("web.service.consul")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    r = DNSRecord.parse(a.handle(q.pack()))  # type: ignore[arg-type]
    assert r.header.rcode == 0 and (r.ar[0].ttl >> 24) == 1  # extended rcode 16 = BADVERS


def test_vips_answer_with_the_sidecar_address(catalog: StaticCatalog) -> None:
    a = Answerer(catalog, vips={"orders-db": Vip("127.0.0.10", 5432), "ledger": Vip("127.0.0.11")})
    assert rdata(ask(a, "orders-db.service.consul")) == ["127.0.0.10"]
    assert rdata(ask(a, "primary.orders-db.service.consul")) == ["127.0.0.10"]
    assert rdata(ask(a, "ledger.service.consul")) == ["127.0.0.11"]  # not in the catalog
    srv = ask(a, "orders-db.service.consul", "SRV")
    assert rdata(srv) == ["1 1 5432 7f00000a.addr.dc1.consul."] and rdata(srv, "ar") == [
        "127.0.0.10"
    ]
    assert not ask(a, "ledger.service.consul", "SRV").rr
    assert not ask(a, "orders-db.service.consul", "AAAA").rr
    assert rdata(ask(a, "web.service.consul")) == ["10.0.0.11", "10.0.0.12"]


ROUTES = """\
  billing-sidecar:
    - {address: 127.0.0.10, port: 5432, node: node-a, tags: [sluice, sluice-route],
       meta: {app: billing, instance: billing-1, route_service: orders-db}}
    - {address: 127.0.0.20, port: 5432, node: node-b, tags: [sluice, sluice-route],
       health: critical, meta: {app: billing, instance: billing-2, route_service: orders-db}}
    - {address: 127.0.0.30, port: 8080, node: node-a, tags: [sluice],
       meta: {app: billing, instance: billing-1, route_service: web}}
    - {address: sidecar.local, port: 9000, node: node-a, tags: [sluice-route],
       meta: {app: billing, instance: billing-1, route_service: v6only}}
"""


def test_vips_from_the_catalog_are_the_apps_route_listeners(
    catalog_file: Path, catalog: StaticCatalog
) -> None:
    catalog_file.write_text(catalog_file.read_text() + ROUTES)
    catalog.poll()
    a = Answerer(catalog, vip_app="Billing")
    assert rdata(ask(a, "orders-db.service.consul")) == ["127.0.0.10"]  # passing first
    assert rdata(ask(a, "primary.orders-db.service.consul")) == ["127.0.0.10"]
    srv = ask(a, "orders-db.service.consul", "SRV")
    assert rdata(srv) == ["1 1 5432 7f00000a.addr.dc1.consul."]
    # Not route registrations (no sluice-route tag; a host name): the catalog's answer.
    assert rdata(ask(a, "web.service.consul")) == ["10.0.0.11", "10.0.0.12"]
    assert rdata(ask(a, "v6only.service.consul", "AAAA")) == ["fd00::7"]
    # One instance's listeners; a critical registration still counts (fails closed).
    b = Answerer(catalog, vip_app="billing", vip_instance="billing-2")
    assert rdata(ask(b, "orders-db.service.consul")) == ["127.0.0.20"]
    # Another app's meshdns, and a static --vip, are not affected / win.
    assert rdata(ask(Answerer(catalog, vip_app="reporting"), "orders-db.service.consul")) == [
        "10.0.0.1"
    ]
    c = Answerer(catalog, vips={"orders-db": Vip("127.0.0.99")}, vip_app="billing")
    assert rdata(ask(c, "orders-db.service.consul")) == ["127.0.0.99"]
    # The sidecar deregistered: the name is the service's again (the cache follows the index).
    catalog_file.write_text(catalog_file.read_text().replace(ROUTES, ""))
    catalog.poll()
    assert rdata(ask(a, "orders-db.service.consul")) == ["10.0.0.1"]


def _header(qid: int, flags: int, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


@pytest.mark.parametrize(
    ("packet", "want"),
    [
        (b"", None),
        (b"\x12\x34\x01", None),  # no header: nothing to answer to
        (_header(0x1234, 0x0100), "FORMERR"),  # promises a question, has none
        (_header(0x1234, 0x0100) + b"\x03web\x07service", "FORMERR"),  # truncated name
        (_header(0x1234, 0x0100, qd=2) + b"\x00\x00\x01\x00\x01" * 2, "FORMERR"),
        (_header(0x1234, 0x0100, qd=0), "FORMERR"),
        (_header(0x1234, 0x2100) + b"\x00\x00\x01\x00\x01", "NOTIMP"),  # opcode 4, NOTIFY
        (_header(0x1234, 0x8180) + b"\x00\x00\x01\x00\x01", None),  # a response: dropped
        (_header(0x1234, 0x0100) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "FORMERR"),
    ],
)
def test_malformed_packets(a: Answerer, packet: bytes, want: str | None) -> None:
    out = a.handle(packet)
    if want is None:
        assert out is None
        return
    assert isinstance(out, bytes) and out[:2] == b"\x12\x34"
    assert str(RCODE[out[3] & 0x0F]) == want and out[2] & 0x80


def test_a_compressed_question_takes_the_slow_path(a: Answerer) -> None:
    # A name that is a compression pointer to itself: the fast path declines it, dnslib
    # rejects the loop, and the answer is FORMERR (never a hang).
    loop = _header(0x4321, 0x0100) + b"\xc0\x0c\x00\x01\x00\x01"
    out = a.handle(loop)
    assert isinstance(out, bytes) and out[3] & 0x0F == 1
    assert read_question(loop) is None


def test_fast_path_reads_the_question() -> None:
    q = DNSRecord.question("Web.Service.Consul", "SRV")
    q.add_ar(EDNS0(udp_len=99999 % 65536))
    got = read_question(q.pack())
    assert got is not None and got.qname == "web.service.consul." and got.qtype == 33
    assert got.edns and got.udp_size == 4096  # clamped to what we send
    assert read_question(q.pack() + b"\x00") is None  # trailing bytes: slow path
