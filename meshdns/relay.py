"""A split DNS relay: mesh names to meshdns, every other name to the host's resolvers.

`sluice run` gives the app's namespace a resolv.conf with `nameserver 127.0.0.1`; this
relay answers there (its UDP and TCP sockets are made inside the namespace by the
caller; the relay itself runs in the host namespace, so its own queries reach meshdns on
the host's loopback and the host's resolvers as they are). A query for a name in the
mesh domain (`consul.` unless told otherwise) goes to meshdns (`sluice up` serves it on
127.0.0.1:8600); anything else goes to the recursors from the host's /etc/resolv.conf.
Both through `Forwarder` (forward.py): UDP stays UDP, TCP stays TCP, bounded in flight;
when every server fails the app gets SERVFAIL with its question echoed.

TCP framing is RFC 1035's 2-byte length; at most `MAX_TCP` connections at once, each
closed after `TCP_IDLE` seconds without a query.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from dnslib import DNSRecord

from meshdns.forward import Forwarder
from meshdns.wire import QR, RA, RD, read_question

log = logging.getLogger("sluice.meshdns")

SERVFAIL = 2
MAX_TCP = 64
TCP_IDLE = 10.0


def host_resolvers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` lines of a resolv.conf, as (address, 53)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append((parts[1], 53))  # a scope (fe80::1%eth0) stays: getaddrinfo reads it
    return out


def resolv_conf(path: str = "/etc/resolv.conf") -> str:
    """resolv.conf for a namespace served by the relay on 127.0.0.1:53: the host's search
    and options lines kept, its nameservers replaced (the relay forwards to them)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        lines = []
    kept = [ln for ln in lines if ln.split()[:1] in (["search"], ["domain"], ["options"])]
    head = "# sluice run: the DNS relay (mesh names to meshdns, others to the host's resolvers)"
    return "\n".join([head, "nameserver 127.0.0.1", *kept]) + "\n"


def question_name(data: bytes) -> str | None:
    """The lowercased query name with its trailing dot, or None for a packet we cannot read."""
    q = read_question(data)
    if q is not None:
        return q.qname
    try:
        return str(DNSRecord.parse(data).q.qname).lower()
    except Exception:  # dnslib raises several kinds on garbage
        return None


def servfail(data: bytes) -> bytes | None:
    """SERVFAIL for a plain query, its question echoed (stub resolvers check it)."""
    q = read_question(data)
    if q is None:
        return None
    flags = QR | RA | (q.flags & RD) | SERVFAIL
    return struct.pack("!HHHHHH", q.id, flags, 1, 0, 0, 0) + q.question


class DnsRelay:
    def __init__(
        self,
        meshdns: tuple[str, int],
        recursors: Sequence[tuple[str, int]],
        domain: str = "consul",
    ) -> None:
        self.domain = domain.strip(".").lower() + "."
        self.mesh = Forwarder([meshdns])
        self.outside = Forwarder(recursors)
        self.queries = 0
        self._transports: list[asyncio.BaseTransport] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[_Tcp] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, udp: socket.socket, tcp: socket.socket) -> None:
        """Serve on two bound sockets (a listening one for TCP)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._transports.append(transport)
        self._servers.append(await loop.create_server(lambda: _Tcp(self), sock=tcp))

    async def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def in_domain(self, name: str) -> bool:
        return name == self.domain or name.endswith("." + self.domain)

    async def resolve(self, data: bytes, tcp: bool) -> bytes | None:
        """The answer to one query, SERVFAIL when no server answered, None to drop it."""
        self.queries += 1
        name = question_name(data)
        if name is None:
            return None
        forwarder = self.mesh if self.in_domain(name) else self.outside
        answer = await forwarder.resolve(data, tcp) if forwarder.recursors else None
        return answer if answer is not None else servfail(data)

    def spawn(self, data: bytes, tcp: bool, reply: Callable[[bytes], None]) -> None:
        async def answer() -> None:
            out = await self.resolve(data, tcp)
            if out is not None:
                reply(out)

        task = asyncio.get_running_loop().create_task(answer())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, relay: DnsRelay) -> None:
        self.relay = relay
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        def reply(out: bytes) -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(out, addr)

        self.relay.spawn(data, False, reply)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns relay udp error: %r", exc)


class _Tcp(asyncio.Protocol):
    def __init__(self, relay: DnsRelay) -> None:
        self.relay = relay
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.relay._conns) >= MAX_TCP:
            self.transport.abort()
            return
        self.relay._conns.add(self)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(TCP_IDLE, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self._arm()
        self.buffer += data
        while len(self.buffer) >= 2:
            (size,) = struct.unpack_from("!H", self.buffer)
            if len(self.buffer) < 2 + size:
                return
            message = bytes(self.buffer[2 : 2 + size])
            del self.buffer[: 2 + size]
            self.relay.spawn(message, True, self._send)

    def _send(self, out: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(out)) + out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
