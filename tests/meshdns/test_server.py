"""meshdns over real sockets: dnslib's client and dig, UDP and TCP, forwarding, limits."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from meshdns.answer import Answerer
from meshdns.catalog import StaticCatalog
from meshdns.forward import Forwarder

from .conftest import CATALOG, ServerThread, many

HOST = "127.0.0.1"


def query(port: int, name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    r = DNSRecord.parse(q.send(HOST, port, tcp=tcp, timeout=5))
    assert r.header.id == q.header.id
    return r


def addresses(r: DNSRecord) -> list[str]:
    return sorted(str(x.rdata) for x in r.rr)


def dead_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def server(catalog: StaticCatalog, serve: type[ServerThread]) -> ServerThread:
    return serve(Answerer(catalog))


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dnslib_client(server: ServerThread, tcp: bool) -> None:
    assert addresses(query(server.port, "web.service.consul", tcp=tcp)) == [
        "10.0.0.11",
        "10.0.0.12",
    ]
    srv = query(server.port, "_web._v1.service.consul", "SRV", tcp=tcp)
    assert [x.rdata.port for x in srv.rr] == [8080] and len(srv.ar) == 1
    nx = query(server.port, "nope.service.consul", tcp=tcp)
    assert RCODE[nx.header.rcode] == "NXDOMAIN" and len(nx.auth) == 1
    key = "tcp_queries" if tcp else "udp_queries"
    assert server.server.counters()[key] == 3


def test_health_changes_change_the_answers(catalog_file: Path, serve: type[ServerThread]) -> None:
    server = serve(Answerer(StaticCatalog(catalog_file)))
    assert addresses(query(server.port, "v1.web.service.consul")) == ["10.0.0.11"]
    catalog_file.write_text(
        CATALOG.replace("tags: [v1, blue]}", "tags: [v1, blue], health: critical}").replace(
            "tags: [v1], health: critical}", "tags: [v1]}"
        )
    )
    eventually(lambda: addresses(query(server.port, "v1.web.service.consul")) == ["10.0.0.13"])
    catalog_file.write_text(CATALOG.replace("health: warning", "health: critical"))
    eventually(lambda: addresses(query(server.port, "web.service.consul")) == ["10.0.0.11"])


def test_truncation_over_udp_and_full_answers_over_tcp(
    catalog_file: Path, serve: type[ServerThread]
) -> None:
    catalog_file.write_text(many(300))
    server = serve(Answerer(StaticCatalog(catalog_file)))
    udp = query(server.port, "big.service.consul")
    assert udp.header.tc == 1 and 0 < len(udp.rr) < 300
    tcp = query(server.port, "big.service.consul", tcp=True)
    assert tcp.header.tc == 0 and len(tcp.rr) == 300
    srv = query(server.port, "big.service.consul", "SRV", tcp=True)
    assert len(srv.rr) == len(srv.ar) == 300


def test_forwarding_to_a_second_resolver(catalog: StaticCatalog, serve: type[ServerThread]) -> None:
    other = serve(Answerer(catalog, domain="example."))  # the "recursor": answers example.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, never answers
    silent.bind((HOST, 0))
    try:
        recursors = [(HOST, dead_port()), (HOST, silent.getsockname()[1]), (HOST, other.port)]
        forwarder = Forwarder(recursors, timeout=0.3)
        server = serve(Answerer(catalog, recursion=True), forwarder)
        for tcp in (False, True):
            r = query(server.port, "web.service.example", tcp=tcp)
            assert (
                addresses(r) == ["10.0.0.11", "10.0.0.12"]
                and str(r.q.qname) == "web.service.example."
            )
        assert forwarder.stats.answered == 2 and forwarder.stats.recursor_errors >= 3
        assert query(server.port, "web.service.consul").header.ra == 1  # still ours
    finally:
        silent.close()


def test_servfail_when_every_recursor_fails(
    catalog: StaticCatalog, serve: type[ServerThread]
) -> None:
    forwarder = Forwarder([(HOST, dead_port()), (HOST, dead_port())], timeout=0.3)
    server = serve(Answerer(catalog, recursion=True), forwarder)
    for tcp in (False, True):
        r = query(server.port, "example.org", tcp=tcp)
        assert RCODE[r.header.rcode] == "SERVFAIL" and str(r.q.qname) == "example.org."
    assert forwarder.stats.failed == 2


def test_forwards_in_flight_are_bounded(catalog: StaticCatalog, serve: type[ServerThread]) -> None:
    forwarder = Forwarder([(HOST, dead_port())], max_in_flight=0)
    server = serve(Answerer(catalog, recursion=True), forwarder)
    assert RCODE[query(server.port, "example.org").header.rcode] == "SERVFAIL"
    assert forwarder.stats.overloaded == 1


def test_malformed_udp_packets(server: ServerThread) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(
            b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07garbage", (HOST, server.port)
        )
        reply = s.recv(600)
        assert reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == 1  # FORMERR
        s.sendto(b"\x01\x02\x03", (HOST, server.port))  # no header: dropped
        with pytest.raises(TimeoutError):
            s.recv(600)
    assert addresses(query(server.port, "web.service.consul")) == ["10.0.0.11", "10.0.0.12"]
    assert server.server.answerer.stats.formerr == 1 and server.server.answerer.stats.dropped == 1


def _frame(name: str, qid: int) -> bytes:
    q = DNSRecord.question(name)
    q.header.id = qid
    data = q.pack()
    return struct.pack("!H", len(data)) + data


def _read_frame(s: socket.socket) -> bytes:
    head = b""
    while len(head) < 2:
        chunk = s.recv(2 - len(head))
        assert chunk, "connection closed"
        head += chunk
    (size,) = struct.unpack("!H", head)
    body = b""
    while len(body) < size:
        chunk = s.recv(size - len(body))
        assert chunk, "connection closed"
        body += chunk
    return body


def test_tcp_pipelining_byte_by_byte(server: ServerThread) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as s:
        data = _frame("web.service.consul", 1) + _frame("node-a.node.consul", 2)
        for i in range(len(data)):  # one byte at a time
            s.sendall(data[i : i + 1])
        replies = {DNSRecord.parse(_read_frame(s)).header.id for _ in range(2)}
        assert replies == {1, 2}


def test_tcp_bad_framing_closes_the_connection(server: ServerThread) -> None:
    with socket.create_connection((HOST, server.port), timeout=5) as s:
        s.sendall(b"\x00\x03abc")
        assert s.recv(10) == b""
    assert server.server.stats.tcp_aborted == 1


def test_tcp_idle_and_connection_limits(catalog: StaticCatalog, serve: type[ServerThread]) -> None:
    server = serve(Answerer(catalog), tcp_idle_timeout=0.3, max_tcp_connections=2)
    a = socket.create_connection((HOST, server.port), timeout=5)
    b = socket.create_connection((HOST, server.port), timeout=5)
    c = socket.create_connection((HOST, server.port), timeout=5)
    try:
        assert c.recv(10) == b""  # over the limit: closed at accept
        assert a.recv(10) == b"" and b.recv(10) == b""  # idle: closed after 0.3 s
    finally:
        for s in (a, b, c):
            s.close()
    stats = server.server.stats
    assert stats.tcp_refused == 1 and stats.tcp_idle_closed == 2


DIG = shutil.which("dig")
needs_dig = pytest.mark.skipif(
    DIG is None,
    reason="dig not installed (Debian: apt-get install dnsutils; `make install` does it as root)",
)


def dig(port: int, *args: str) -> str:
    assert DIG is not None
    cmd = [DIG, f"@{HOST}", "-p", str(port), "+time=2", "+tries=1", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    return r.stdout


@needs_dig
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig(server: ServerThread, transport: str) -> None:
    out = dig(server.port, transport, "+short", "web.service.consul")
    assert sorted(out.split()) == ["10.0.0.11", "10.0.0.12"]
    out = dig(server.port, transport, "+short", "_web._v2.service.consul", "SRV")
    assert out.strip() == "1 1 8081 0a00000c.addr.dc1.consul."
    out = dig(server.port, transport, "nope.service.consul")
    assert "status: NXDOMAIN" in out and "flags: qr aa rd;" in out and "IN\tSOA\tns.consul." in out


@needs_dig
def test_dig_sees_truncation_and_retries_over_tcp(
    catalog_file: Path, serve: type[ServerThread]
) -> None:
    catalog_file.write_text(many(120))
    server = serve(Answerer(StaticCatalog(catalog_file)))
    trimmed = dig(server.port, "+ignore", "+noedns", "big.service.consul")
    assert " tc " in trimmed.split("flags:")[1].split(";")[0] + " "
    full = dig(server.port, "+short", "big.service.consul")  # dig retries over TCP on TC
    assert len(full.split()) == 120
