"""The asyncio driver: UDP and TCP listeners around the sans-I/O `Answerer`.

Only this module (and `forward.py`) touches sockets. UDP queries are answered inside
`datagram_received`; TCP uses RFC 1035 4.2.2 framing (a 2-byte length before every
message), may pipeline, and answers out of order (RFC 7766 6.2.1.1). Names outside the
domain go to the `Forwarder`, whose tasks are tracked and cancelled on close.

Limits, so that no client and no flood can grow memory without bound:
- TCP: at most `max_tcp_connections` at once (later ones are closed at accept), an idle
  timeout, at most one message's worth of buffered input, at most `max_tcp_pending`
  forwards in flight per connection (reading pauses past it), and a connection whose
  peer does not read its answers (`MAX_WRITE_BUFFER`) is aborted.
- UDP: answers are dropped while the socket's send buffer is full (pause_writing).
- Forwards: bounded in `Forwarder`; past the bound the answer is SERVFAIL at once.

The catalog's `poll()` runs in a worker thread every `POLL_INTERVAL` seconds (one at a time),
so that reloading a catalog file (YAML parsing: milliseconds for a few dozen services) never
holds up answers on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from meshdns.answer import Answerer, Forward
from meshdns.catalog import POLL_INTERVAL
from meshdns.forward import Forwarder

log = logging.getLogger("sluice.meshdns")

MAX_WRITE_BUFFER = 256 * 1024  # answers queued for a TCP client that is not reading
BIND_ATTEMPTS = 20  # port 0: tries to find one port free for both UDP and TCP


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8600
    tcp_idle_timeout: float = 10.0  # RFC 7766 6.2.3 suggests seconds, not minutes
    max_tcp_connections: int = 256
    max_tcp_pending: int = 16


@dataclass(slots=True)
class ServerStats:
    udp_queries: int = 0
    udp_dropped_busy: int = 0  # answers not sent: the UDP send buffer was full
    tcp_queries: int = 0
    tcp_connections: int = 0
    tcp_refused: int = 0  # over max_tcp_connections
    tcp_idle_closed: int = 0
    tcp_aborted: int = 0  # bad framing or a peer that does not read


class DnsServer:
    def __init__(
        self, answerer: Answerer, config: ServerConfig, forwarder: Forwarder | None = None
    ) -> None:
        self.answerer = answerer
        self.config = config
        self.forwarder = forwarder
        self.stats = ServerStats()
        self.port = config.port
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_paused = False
        self._tcp: asyncio.Server | None = None
        self._conns: set[_TcpConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll_timer: asyncio.TimerHandle | None = None
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(BIND_ATTEMPTS):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.config.host, self.config.port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await loop.create_server(
                    lambda: _TcpConn(self), self.config.host, port, reuse_address=True
                )
            except OSError:
                udp.close()
                if self.config.port or attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            self._udp, self.port = udp, port
            break
        self._poll_timer = loop.call_later(POLL_INTERVAL, self._poll)

    async def close(self) -> None:
        self._closing = True
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for conn in list(self._conns):
            conn.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
        await asyncio.sleep(0)  # let transports run connection_lost before the loop goes

    def counters(self) -> dict[str, int]:
        """Every counter, flat, for logs and the Metrics section of meshdns/README.md."""
        out: dict[str, int] = {}
        for prefix, stats in (
            ("", self.answerer.stats),
            ("", self.stats),
            ("forward_", self.forwarder.stats if self.forwarder else None),
        ):
            if stats is None:
                continue
            for name in stats.__slots__:
                value = getattr(stats, name)
                if isinstance(value, int):
                    out[prefix + name] = value
        for rcode, n in sorted(self.answerer.stats.rcodes.items()):
            out[f"rcode_{rcode}"] = n
        return out

    def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, self._poll_catalog)
        done.add_done_callback(lambda _: self._poll_again(loop))

    def _poll_catalog(self) -> None:  # in a worker thread
        try:
            self.answerer.catalog.poll()
        except Exception:  # a provider bug must not stop DNS: log it, keep answering
            log.exception("catalog poll failed")

    def _poll_again(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._closing and not loop.is_closed():
            self._poll_timer = loop.call_later(POLL_INTERVAL, self._poll)

    def forward(self, fwd: Forward, tcp: bool, reply: Callable[[bytes], None]) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(fwd, tcp, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, fwd: Forward, tcp: bool, reply: Callable[[bytes], None]) -> None:
        answer = None
        if self.forwarder is not None:
            answer = await self.forwarder.resolve(fwd.data, tcp)
        reply(answer if answer is not None else self.answerer.servfail(fwd))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        server = self.server
        server.stats.udp_queries += 1
        out = server.answerer.handle(data, tcp=False)
        if out is None:
            return
        if isinstance(out, Forward):
            server.forward(out, False, lambda answer: self._send(answer, addr))
        else:
            self._send(out, addr)

    def _send(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.server._udp_paused or self.transport is None or self.transport.is_closing():
            self.server.stats.udp_dropped_busy += 1
            return
        self.transport.sendto(data, addr)

    def pause_writing(self) -> None:
        self.server._udp_paused = True

    def resume_writing(self) -> None:
        self.server._udp_paused = False

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do.
        log.debug("udp error: %r", exc)


class _TcpConn(asyncio.Protocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.pending = 0
        self.paused = False
        self.closed = False
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        server = self.server
        if len(server._conns) >= server.config.max_tcp_connections:
            server.stats.tcp_refused += 1
            self.closed = True
            transport.abort()
            return
        server._conns.add(self)
        server.stats.tcp_connections += 1
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.timer = loop.call_later(server.config.tcp_idle_timeout, self._idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last = asyncio.get_running_loop().time()
        buf = self.buffer
        buf += data
        while len(buf) >= 2:  # bounded: each round consumes at least 3 bytes or stops
            (size,) = struct.unpack_from("!H", buf)
            if size < 12:  # not even a header: the stream cannot be trusted past this
                self._abort()
                return
            if len(buf) < 2 + size:
                break  # at most 2 + 65535 bytes wait here: the length field bounds it
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            self._handle(message)
            if self.closed:
                return
        if self.pending >= self.server.config.max_tcp_pending and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _handle(self, message: bytes) -> None:
        server = self.server
        server.stats.tcp_queries += 1
        out = server.answerer.handle(message, tcp=True)
        if out is None:
            return
        if isinstance(out, Forward):
            self.pending += 1
            server.forward(out, True, self._forwarded)
        else:
            self._send(out)

    def _forwarded(self, answer: bytes) -> None:
        self.pending -= 1
        self._send(answer)
        if self.paused and self.pending < self.server.config.max_tcp_pending and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _send(self, answer: bytes) -> None:
        if self.closed:
            return
        self.transport.write(struct.pack("!H", len(answer)) + answer)
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._abort()

    def _abort(self) -> None:
        self.server.stats.tcp_aborted += 1
        self.closed = True
        self.transport.abort()

    def _idle(self) -> None:
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        left = self.last + self.server.config.tcp_idle_timeout - loop.time()
        if left > 0 or self.pending:
            self.timer = loop.call_later(max(left, 0.1), self._idle)
            return
        self.server.stats.tcp_idle_closed += 1
        self.closed = True
        self.transport.close()


async def serve(
    answerer: Answerer,
    config: ServerConfig,
    forwarder: Forwarder | None = None,
    ready: Callable[[DnsServer], None] | None = None,
) -> None:
    """Run until cancelled (Ctrl-C under asyncio.run), then close every socket."""
    server = DnsServer(answerer, config, forwarder)
    await server.start()
    try:
        if ready is not None:
            ready(server)
        await asyncio.Event().wait()
    finally:
        await server.close()
