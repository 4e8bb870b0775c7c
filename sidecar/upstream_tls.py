"""Connecting to a PostgreSQL upstream with TLS, and the connect-error wording both
protocols share.

libpq's way with libpq's sslmode names (`disable`, `prefer`, `require`, `verify-ca`,
`verify-full`): an SSLRequest first; the server's one-byte answer decides (exactly one byte:
anything after it would come from outside the TLS session, CVE-2021-23222), then the
handshake on the same connection. `connect_tls` does it for the driver's Protocol
connections, `open_upstream` for stream connections (cancel requests). MySQL starts TLS in
the middle of its own handshake instead (sidecar/mysql_handshake.py, the driver's
`_upgrade_mysql`); it shares `tls_context`.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from typing import TypeVar

from sidecar.config import Route, UpstreamTls
from sidecar.protocols import postgres as pg

_SSL_REQUEST = struct.pack("!ii", 8, pg.SSL_REQUEST)
P = TypeVar("P", bound=asyncio.Protocol)


class TlsRefused(Exception):
    """The upstream refused TLS where the route requires it, or closed during it."""


def tls_context(tls: UpstreamTls) -> ssl.SSLContext:
    """verify-ca/verify-full check the certificate (and the name) against `ca_file`, else
    the system's CAs; prefer/require encrypt without checking, as libpq does."""
    if tls.mode in ("verify-ca", "verify-full"):
        context = ssl.create_default_context(cafile=tls.ca_file)
        context.check_hostname = tls.mode == "verify-full"
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # prefer/require: encrypt, no checks
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_accepted(answer: bytes, route: Route) -> bool:
    """The server's answer to SSLRequest: True to start TLS, False to go on in plaintext.
    Anything but exactly one byte is refused: bytes after the answer would have come from
    outside the TLS session (CVE-2021-23222)."""
    if answer == b"S":
        return True
    if answer == b"N" and route.tls.mode == "prefer":
        return False
    raise TlsRefused(
        f"the server does not accept TLS (answered {answer[:16]!r}; tls mode {route.tls.mode})"
    )


async def negotiate_tls(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, route: Route
) -> bool:
    writer.write(_SSL_REQUEST)
    await writer.drain()
    try:
        answer = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        raise TlsRefused("the server closed the connection during TLS negotiation") from None
    return tls_accepted(answer, route)


class _TlsAnswer(asyncio.Protocol):
    """Waits for the server's answer to SSLRequest. A plain Protocol, not a StreamWriter:
    a StreamWriter that is garbage-collected closes its transport, which here lives on."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(
                TlsRefused("the server closed the connection during TLS negotiation")
            )


async def connect_tls(route: Route, address: tuple[str, int], factory: Callable[[], P]) -> P:
    """A connection to `address` with TLS negotiated as `route.tls` says, handed to the
    Protocol `factory` makes once it is up (plaintext when `prefer` and the server says no)."""
    loop = asyncio.get_running_loop()
    transport, negotiation = await loop.create_connection(_TlsAnswer, *address)
    try:
        transport.write(_SSL_REQUEST)
        if tls_accepted(await negotiation.answer, route):
            server_name = route.tls.server_name or address[0]
            new = await loop.start_tls(
                transport, negotiation, tls_context(route.tls), server_hostname=server_name
            )
            assert new is not None
            transport = new
    except BaseException:  # refused, a failed handshake, or the connect timeout
        transport.close()
        raise
    proto = factory()
    transport.set_protocol(proto)
    proto.connection_made(transport)
    return proto


async def open_upstream(
    route: Route, address: tuple[str, int]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        if route.tls.mode != "disable" and await negotiate_tls(reader, writer, route):
            server_name = route.tls.server_name or address[0]
            await writer.start_tls(tls_context(route.tls), server_hostname=server_name)
    except BaseException:
        writer.close()
        raise
    return reader, writer


def hp(host: str, port: int) -> str:
    """HOST:PORT as error messages print it ([::1]:5432 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(exc: BaseException, timeout: float) -> str:
    """Why a connect failed, in the words the app's error message uses."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
