"""The transparent listener: connections REDIRECTed from an app's namespace (`sluice run`).

Its listening sockets are made inside the app's namespace (sidecar/netns.py) while the
sidecar runs in the host namespace. For each accepted connection it reads where the app
meant to go (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST for IPv6), finds the route that
destination belongs to, and hands the connection to that route's protocol machinery
(`Sidecar.client_side` in sidecar/server.py), exactly as if the app had
connected to the route's own listener. The sidecar then connects to the route's upstream.

A destination belongs to a route when it is (in this order) the address of one of the
route's catalog instances (`upstream: NAME.service`, the list the sidecar already
follows), the route's upstream address (names resolved once at start), or the route's
`listen` address (so an app configured for explicit mode keeps working). Anything else is
not a mesh service: with `unknown="pass"` its bytes are relayed unchanged, with "deny"
the connection is reset. Both are audited: protocol "tcp", service
"external:HOST:PORT", decision allow or deny.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any, cast

from sidecar.audit import AuditEvent
from sidecar.passthrough import Passthrough, reset
from sidecar.server import Sidecar, _RouteRuntime

log = logging.getLogger("sluice.transparent")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6
UNKNOWN_MODES = ("pass", "deny")
_LOCALHOST = ("127.0.0.1", "::1")


def original_destination(sock: Any) -> tuple[str, int]:
    """Where a REDIRECTed connection was going, from the namespace's conntrack entry."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # sockaddr_in6
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
    return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def addresses(host: str) -> tuple[str, ...]:
    """An IP literal in canonical form (or both loopbacks for "localhost"); () for a name."""
    if host.lower() == "localhost":
        return _LOCALHOST
    try:
        return (ipaddress.ip_address(host.strip("[]")).compressed,)
    except ValueError:
        return ()


class TransparentListener:
    """Accepts REDIRECTed connections on sockets made in the app's namespace."""

    def __init__(
        self, sidecar: Sidecar, sockets: Sequence[socket.socket], unknown: str = "pass"
    ) -> None:
        if unknown not in UNKNOWN_MODES:
            raise ValueError(f"unknown: expected pass or deny, got {unknown!r}")
        self.sidecar = sidecar
        self.sockets = tuple(sockets)
        self.unknown = unknown
        self.static: dict[tuple[str, int], _RouteRuntime] = {}
        self.passing: set[Passthrough] = set()
        self.counts = {"mesh": 0, "pass": 0, "deny": 0}
        self._servers: list[asyncio.AbstractServer] = []
        self._ids = itertools.count(1)
        self._boot = format(int(time.time() * 1000), "x")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        found: list[tuple[tuple[str, int], _RouteRuntime]] = []
        for rt in self.sidecar.routes:
            route = rt.route
            if rt.picker is None:
                found += [((a, route.upstream[1]), rt) for a in await _resolve(route.upstream[0])]
        for rt in self.sidecar.routes:  # listen addresses come after every upstream
            found += [((a, rt.route.listen[1]), rt) for a in addresses(rt.route.listen[0])]
        for key, rt in found:
            self.static.setdefault(key, rt)
        for sock in self.sockets:
            self._servers.append(await loop.create_server(lambda: _Accepted(self), sock=sock))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for p in list(self.passing):
            p.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def route_for(self, host: str, port: int) -> _RouteRuntime | None:
        """The route an original destination belongs to, or None (not a mesh service)."""
        for rt in self.sidecar.routes:
            if rt.picker is not None and any(
                i.port == port and host in addresses(i.host) for i in rt.picker.instances
            ):
                return rt
        return self.static.get((host, port))

    def accepted(self, transport: asyncio.Transport) -> None:
        try:
            host, port = original_destination(transport.get_extra_info("socket"))
        except OSError as exc:
            log.warning("no original destination for a connection (%s): closed", exc)
            transport.abort()
            return
        rt = self.route_for(host, port)
        if rt is not None:
            self.counts["mesh"] += 1
            side = self.sidecar.client_side(rt)
            transport.set_protocol(side)
            side.connection_made(transport)
            return
        n = next(self._ids)
        if self.unknown == "deny":
            self.counts["deny"] += 1
            log.info("connection to %s denied: not a mesh service", hostport(host, port))
            self.audit(n, time.time(), (host, port), "deny", 0.0, None, 0, 0)
            reset(transport)
            return
        self.counts["pass"] += 1
        p = Passthrough(transport, (host, port), lambda p: self._passed(n, p))
        transport.set_protocol(p)
        self.passing.add(p)
        asyncio.get_running_loop().create_task(p.connect())

    def _passed(self, n: int, p: Passthrough) -> None:
        self.passing.discard(p)
        duration = (time.monotonic() - p.started) * 1000
        self.audit(n, p.at, p.dst, "allow", duration, p.error, p.bytes_in, p.bytes_out)

    def audit(
        self,
        n: int,
        at: float,
        dst: tuple[str, int],
        decision: str,
        duration_ms: float,
        error: str | None,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        config = self.sidecar.config
        if decision == "allow" and config.audit.record != "all":
            return
        where = hostport(*dst)
        self.sidecar.sink.record(
            AuditEvent(
                id=f"{config.instance}-{self._boot}-x{n}",
                time=at,
                app=config.app,
                instance=config.instance,
                service=f"external:{where}",
                session=f"{config.instance}-x{n}",
                protocol="tcp",
                decision=decision,
                action=decision,
                enforced=True,
                rules=(),
                rule=None,
                verbs=(),
                tables=(),
                statement=f"CONNECT {where}",
                duration_ms=round(duration_ms, 3),
                error=error,
                policy_version=self.sidecar.policy_version(),
                bytes_in=bytes_in,
                bytes_out=bytes_out,
            )
        )


async def _resolve(host: str) -> tuple[str, ...]:
    literal = addresses(host)
    if literal:
        return literal
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("upstream %s does not resolve (%s): not matched transparently", host, exc)
        return ()
    return tuple(dict.fromkeys(addresses(str(info[4][0]))[0] for info in infos))


class _Accepted(asyncio.Protocol):
    """A fresh connection, until `accepted` gives it to a route or a passthrough."""

    def __init__(self, listener: TransparentListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.listener.accepted(cast(asyncio.Transport, transport))  # uvloop's: no subclass
