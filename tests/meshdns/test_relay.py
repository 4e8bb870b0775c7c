"""The split DNS relay `sluice run` puts in an app's namespace (meshdns/relay.py).

Real sockets on loopback: meshdns over the test catalog stands for `sluice up`'s DNS, a
second meshdns (domain `example`) stands for the host's resolver; the relay sends mesh
names to the first and everything else to the second, over UDP and TCP, and answers
SERVFAIL (its question echoed) when the server it needs is down.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from meshdns.answer import Answerer
from meshdns.catalog import StaticCatalog
from meshdns.relay import DnsRelay, host_resolvers, question_name, resolv_conf, servfail
from tests.meshdns.conftest import ServerThread


def dead_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def servers(catalog: StaticCatalog) -> Iterator[tuple[ServerThread, ServerThread]]:
    mesh = ServerThread(Answerer(catalog))
    outside = ServerThread(Answerer(catalog, domain="example"))
    yield mesh, outside
    mesh.stop()
    outside.stop()


async def ask(relay_port: int, name: str, tcp: bool = False) -> DNSRecord:
    query = DNSRecord.question(name, "A").pack()
    loop = asyncio.get_running_loop()
    if tcp:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
        writer.write(struct.pack("!H", len(query)) + query)
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        data = await reader.readexactly(size)
        writer.close()
        return DNSRecord.parse(data)
    done: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            done.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(
        Client, remote_addr=("127.0.0.1", relay_port)
    )
    try:
        transport.sendto(query)
        return DNSRecord.parse(await asyncio.wait_for(done, 5))
    finally:
        transport.close()


async def relay_on(mesh: int, outside: int) -> tuple[DnsRelay, int]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", port))
    tcp.listen()
    for s in (udp, tcp):
        s.setblocking(False)
    relay = DnsRelay(("127.0.0.1", mesh), [("127.0.0.1", outside)])
    await relay.start(udp, tcp)
    return relay, port


def test_mesh_names_to_meshdns_others_to_the_host_resolver(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    mesh, outside = servers

    async def scenario() -> None:
        relay, port = await relay_on(mesh.port, outside.port)
        try:
            for tcp in (False, True):
                a = await ask(port, "orders-db.service.consul", tcp)
                assert [str(r.rdata) for r in a.rr] == ["10.0.0.1"]
                b = await ask(port, "ORDERS-DB.service.example", tcp)  # not ours: outside
                assert [str(r.rdata) for r in b.rr] == ["10.0.0.1"]
                c = await ask(port, "web.service.consul.example", tcp)  # outside's zone
                assert c.header.rcode == RCODE.NXDOMAIN
            assert relay.queries == 6
            assert mesh.server.counters()["queries"] == 2
        finally:
            await relay.close()

    asyncio.run(scenario())


def test_servfail_with_the_question_when_the_server_is_down(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    mesh, _ = servers

    async def scenario() -> None:
        relay, port = await relay_on(mesh.port, dead_port())
        relay.outside.timeout = 0.3
        try:
            answer = await ask(port, "example.org")
            assert answer.header.rcode == RCODE.SERVFAIL
            assert str(answer.q.qname) == "example.org." and answer.q.qtype == QTYPE.A
            ok = await ask(port, "orders-db.service.consul")  # the mesh side still answers
            assert ok.header.rcode == RCODE.NOERROR
        finally:
            await relay.close()

    asyncio.run(scenario())


def test_question_name_and_servfail_edges() -> None:
    query = DNSRecord.question("Web.Service.Consul", "A")
    assert question_name(query.pack()) == "web.service.consul."
    query.add_answer(*DNSRecord.question("x", "A").rr)  # not the fast path's shape
    assert question_name(query.pack()) == "web.service.consul."
    assert question_name(b"\x00" * 5) is None
    assert servfail(b"\x00" * 5) is None


def test_resolv_conf_keeps_search_and_options(tmp_path: Path) -> None:
    host = tmp_path / "resolv.conf"
    host.write_text(
        "# host\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nsearch corp.example\n"
        "options ndots:2 edns0\n"
    )
    assert host_resolvers(str(host)) == [("10.0.0.53", 53), ("fe80::1%eth0", 53)]
    text = resolv_conf(str(host))
    assert "nameserver 127.0.0.1\n" in text
    assert "10.0.0.53" not in text
    assert "search corp.example\noptions ndots:2 edns0\n" in text
    assert host_resolvers(str(tmp_path / "missing")) == []
