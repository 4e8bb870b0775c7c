"""Forward queries for names outside our domain to the configured recursors, in order.

Each forward uses a fresh connected UDP socket (a new random source port per query, and
only the recursor's own datagrams reach it) and waits `timeout` seconds; on a timeout, an
ICMP error or a reply that does not match, the next recursor is tried. A query that came
over TCP is forwarded over TCP, so a large answer reaches the client whole. The number of
forwards in flight is bounded: past `max_in_flight`, `resolve` fails at once and the
caller answers SERVFAIL, so a flood of foreign names costs no memory and no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("sluice.meshdns")

DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_IN_FLIGHT = 512


@dataclass(slots=True)
class ForwardStats:
    answered: int = 0
    failed: int = 0  # every recursor failed: SERVFAIL
    overloaded: int = 0  # refused at once: too many in flight
    recursor_errors: int = 0  # one recursor timed out or failed (then the next is tried)


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes, done: asyncio.Future[bytes]) -> None:
        self.qid = qid
        self.done = done

    def datagram_received(self, data: bytes, addr: object) -> None:
        # A reply must carry our ID and the QR bit; anything else is ignored, not trusted.
        if not self.done.done() and data[:2] == self.qid and len(data) >= 12 and data[2] & 0x80:
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed"))


class Forwarder:
    def __init__(
        self,
        recursors: Sequence[tuple[str, int]],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.recursors = tuple(recursors)
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.stats = ForwardStats()

    async def resolve(self, data: bytes, tcp: bool = False) -> bytes | None:
        """The first recursor's answer, or None when all failed (or too many in flight)."""
        if self.in_flight >= self.max_in_flight:
            self.stats.overloaded += 1
            return None
        self.in_flight += 1
        try:
            for host, port in self.recursors:
                try:
                    ask = self._tcp if tcp else self._udp
                    answer = await asyncio.wait_for(ask(host, port, data), self.timeout)
                except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    self.stats.recursor_errors += 1
                    log.debug("recursor %s:%d failed: %r", host, port, exc)
                    continue
                self.stats.answered += 1
                return answer
            self.stats.failed += 1
            return None
        finally:
            self.in_flight -= 1

    async def _udp(self, host: str, port: int, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Reply(data[:2], done), remote_addr=(host, port)
        )
        try:
            transport.sendto(data)
            return await done
        finally:
            transport.close()

    async def _tcp(self, host: str, port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            answer = await reader.readexactly(size)
            if answer[:2] != data[:2]:
                raise EOFError("reply with another ID")
            return answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
