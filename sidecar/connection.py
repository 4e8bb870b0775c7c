"""One app connection through the sidecar and its connection to the upstream server.

`ClientSide` is the app's asyncio Protocol: it owns the session (`PgSession`,
`MySqlSession`, `HttpSession`: sans-I/O state machines) and the upstream connection
(`ServerSide`), feeds each read to the session and writes out what the session produced
(`pump`); it connects upstream (with a timeout, TLS when configured, the next catalog
instance after a reset), tells the app when the upstream is down (PostgreSQL: a FATAL 08006
naming it; MySQL: ERR 1043), and passes flow control both ways. For the database protocols
`PassingClientSide`/`PassingServerSide` write a read the session passes unchanged as it
came (`client_pass`/`server_pass`): no copy, no `pump`. MySQL's mid-handshake TLS upgrade is
here too (`_upgrade_mysql`). The listeners, routes, reloads and cancel routing that create
and serve these connections are `sidecar/server.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from sidecar import mysql_session, pg_session
from sidecar.http_session import HttpRouteContext, HttpSession
from sidecar.mysql_session import MySqlSession
from sidecar.pg_session import PgSession
from sidecar.protocols import mysql as my
from sidecar.protocols import postgres as pg
from sidecar.upstream_tls import TlsRefused, connect_tls, describe, hp, tls_context
from sidecar.upstreams import Instance

if TYPE_CHECKING:
    from sidecar.server import Sidecar, _RouteRuntime

log = logging.getLogger("sluice.sidecar")

CONNECTION_FAILURE = "08006"
# A catalog service's instances tried per app connection before the app is told it is down.
CONNECT_ATTEMPTS = 3
# Passive health: what an app sent before a catalog instance first answered is kept (up to
# this much) so that, when that instance resets the connection, the app's connection goes
# on to the next instance with the same opening bytes (a PostgreSQL StartupMessage).
REPLAY_LIMIT = 64 * 1024

# The compiled builds of the sessions when they are current (sidecar/pg_session.py; the
# MySQL session over the compiled sidecar/mysql_responses.py).
PG_SESSION = pg_session.session_class()
MYSQL_SESSION = mysql_session.session_class()


class ClientSide(asyncio.Protocol):
    """The app's connection; owns the session and the upstream connection."""

    def __init__(self, sidecar: Sidecar, rt: _RouteRuntime) -> None:
        self.sidecar = sidecar
        self.rt = rt
        self.transport: asyncio.Transport | None = None
        self.upstream: ServerSide | None = None
        session_id = f"{rt.ctx.instance}-{next(sidecar._ids)}"
        ctx = rt.ctx
        self.session: PgSession | MySqlSession | HttpSession
        if isinstance(ctx, HttpRouteContext):
            self.session = HttpSession(ctx, session_id)
        elif rt.route.protocol == "mysql":
            route = rt.route
            self.session = MYSQL_SESSION(
                ctx, session_id, route.tls.mode, route.upstream_label, lambda: _mysql_tls(self)
            )
        else:
            self.session = PG_SESSION(ctx, session_id)
        self._connecting = False
        self._connect_task: asyncio.Task[None] | None = None  # the last one started
        self._closed = False
        self._paused_by_delay = False
        self._key: bytes | None = None
        self._address: tuple[str, int] = rt.route.upstream  # the server connected to
        self._instance: Instance | None = None  # when picked from the catalog
        # Passive health (catalog upstreams): instances this app connection failed on, and
        # its bytes sent before the instance answered (None: nothing to replay).
        self._tried: frozenset[Instance] = frozenset()
        self._opening: list[bytes | bytearray] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.rt.sessions.add(self)
        if self.session.startup_sent:  # MySQL: the server speaks first, connect now
            self.pump()

    def data_received(self, data: bytes) -> None:
        self.session.client_data(data)
        self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.rt.sessions.discard(self)
        if self._key is not None:
            self.sidecar.cancel_keys.pop(self._key, None)
        if self._instance is not None and self.rt.picker is not None:
            self.rt.picker.closed(self._instance)
            self._instance = None
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:  # the app reads slowly: stop reading the server
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # moving bytes

    def pump(self) -> None:
        s = self.session
        transport = self.transport
        if transport is None:
            return
        if s.to_client:
            # Hand the buffer over and start a new one: no copy, and it is never touched again.
            out, s.to_client = s.to_client, bytearray()
            transport.write(out)
        if s.backend_key is not None and self._key is None:
            self._key = s.backend_key
            self.sidecar.cancel_keys[self._key] = (self.rt.route, self._address)
        up = self.upstream
        if up is not None and up.transport is not None and s.to_server:
            out, s.to_server = s.to_server, bytearray()
            if self._opening is not None:
                self._keep_opening(out, up)
            up.transport.write(out)
        elif s.startup_sent and up is None and not self._connecting and s.closing is None:
            self._start_connect()
        if s.cancel_packet is not None:
            packet, s.cancel_packet = s.cancel_packet, None
            _spawn(self.sidecar.route_cancel(packet))
        if s.wait > 0 and not self._paused_by_delay:
            self._paused_by_delay = True
            transport.pause_reading()
            asyncio.get_running_loop().call_later(s.wait, self._release)
        if s.closing is not None:
            self.close()

    def _release(self) -> None:
        self._paused_by_delay = False
        if self._closed:
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self.session.release()
        self.pump()

    def server_side(self) -> ServerSide:
        """The protocol of a new upstream connection."""
        return ServerSide(self)

    def _start_connect(self, tried: frozenset[Instance] = frozenset()) -> None:
        self._connecting = True
        self._connect_task = _spawn(self._connect(tried))

    async def _connect(self, tried: frozenset[Instance] = frozenset()) -> None:
        route = self.rt.route
        picker = self.rt.picker
        if picker is None:
            result = await self._connect_to(route.upstream)
            if isinstance(result, str):
                self._fail_upstream(
                    f"cannot connect to upstream {route.service} at {hp(*route.upstream)}: {result}"
                )
            elif result is not None:
                self._use(result)
            return
        # A catalog service: the next instance, and another one after a connect failure.
        reason = "no healthy instance in the catalog"
        for _ in range(CONNECT_ATTEMPTS - len(tried)):
            instance = picker.pick(time.monotonic(), tried)
            if instance is None:
                break
            tried |= {instance}
            result = await self._connect_to(instance.address)
            if result is None:
                return
            if not isinstance(result, str) and result.reset is not None:
                result = f"reset on connect ({describe(result.reset, route.connect_timeout)})"
            if isinstance(result, str):
                reason = f"{instance}: {result}"
                picker.failed(instance, time.monotonic())
                log.warning(
                    "route %s: instance %s ejected for %gs",
                    route.service,
                    instance,
                    picker.service.eject_seconds,
                )
                continue
            self._address, self._instance, self._tried = instance.address, instance, tried
            picker.opened(instance)
            # HTTP requests are not replayed: one may have reached the server.
            self._opening = [] if route.protocol != "http" else None
            self._use(result)
            return
        self._fail_upstream(
            f"cannot connect to upstream {route.service} ({route.upstream_label}): {reason}"
        )

    async def _connect_to(self, address: tuple[str, int]) -> ServerSide | str | None:
        """The connection to one server; a string saying why not; None when the app went
        away meanwhile."""
        route = self.rt.route
        loop = asyncio.get_running_loop()
        host, port = address
        try:
            if route.protocol == "http" and route.tls.mode != "disable":
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        self.server_side,
                        host,
                        port,
                        ssl=tls_context(route.tls),
                        server_hostname=route.tls.server_name or host,
                    ),
                    timeout=route.connect_timeout,
                )
            elif route.tls.mode == "disable" or route.protocol == "mysql":  # mysql: _mysql_tls
                _, proto = await asyncio.wait_for(
                    loop.create_connection(self.server_side, host, port),
                    timeout=route.connect_timeout,
                )
            else:
                proto = await asyncio.wait_for(
                    connect_tls(route, address, self.server_side),
                    timeout=route.connect_timeout,
                )
        except (OSError, TimeoutError, ssl.SSLError, TlsRefused) as exc:
            reason = describe(exc, route.connect_timeout)
            log.warning("upstream %s at %s:%d unreachable: %s", route.service, host, port, reason)
            return reason
        if self._closed:
            proto.close()
            return None
        return proto

    def _use(self, proto: ServerSide) -> None:
        self.upstream = proto
        self.pump()

    # -- passive health on resets (catalog upstreams; sidecar/upstreams.py) ------------------

    def _keep_opening(self, out: bytearray, up: ServerSide) -> None:
        opening = self._opening
        assert opening is not None
        if up.answered or sum(map(len, opening)) + len(out) > REPLAY_LIMIT:
            self._opening = None  # the session is under way: nothing will be replayed
        else:
            opening.append(out)  # handed over by pump, never changed afterwards

    def upstream_reset(self, side: ServerSide, exc: Exception) -> bool:
        """The upstream connection was reset (or broke with an error). A catalog instance
        pays for it (`Picker.reset`); when it had not answered yet, the app's connection goes
        on to the next instance and this returns True."""
        instance, picker, route = self._instance, self.rt.picker, self.rt.route
        if picker is None:
            return False
        if side is not self.upstream:
            if self.upstream is None and self._connecting and not side.answered:
                side.reset = exc  # before `_connect` took it: it tries the next instance
                return True
            return False
        if instance is None:
            return False
        if picker.reset(instance, time.monotonic(), side.answered):
            log.warning(
                "route %s: instance %s reset the connection (%s); ejected for %gs",
                route.service,
                instance,
                describe(exc, route.connect_timeout),
                picker.service.eject_seconds,
            )
        opening = self._opening
        if side.answered or opening is None or self._closed:
            return False
        picker.closed(instance)
        self._instance, self.upstream, self._opening = None, None, None
        self.session.to_server[:0] = b"".join(opening)
        self._start_connect(self._tried)
        return True

    def _fail_upstream(self, text: str) -> None:
        session = self.session
        if isinstance(session, HttpSession):
            self._connecting = False
            session.upstream_failed(text)
            self.pump()
            return
        if self.transport is not None and not self._closed:
            if self.rt.route.protocol == "mysql":
                # A server-range code: clients drop the client library's own codes
                # (2003 ...) when a server sends them and print "malformed packet".
                self.transport.write(
                    my.err_packet(0, my.ER_HANDSHAKE_ERROR, "08S01", f"sluice: {text}")
                )
            else:
                self.transport.write(
                    pg.error_response(CONNECTION_FAILURE, f"sluice: {text}", severity="FATAL")
                )
        self.close()

    def server_lost(self) -> None:
        """The server closed its side: flush what it said and close the app's side. An HTTP
        connection that was idle stays open; the next request opens a new one upstream."""
        session = self.session
        if isinstance(session, HttpSession) and not self._closed:
            self.upstream = None
            self._connecting = False
            if self._instance is not None and self.rt.picker is not None:
                self.rt.picker.closed(self._instance)
                self._instance = None
            if not session.upstream_closed():
                self.pump()
                return
            self.pump()
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # writes what is buffered, then closes
        if self.upstream is not None:
            self.upstream.close()


class ServerSide(asyncio.Protocol):
    """The connection to the upstream server, on behalf of one `ClientSide`."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        # Passive health (ClientSide.upstream_reset): the server sent a byte; the error that
        # ended the connection before the app's connection took it.
        self.answered = False
        self.reset: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self.client.session.server_data(data)
        self.client.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        # A reset counts against a catalog instance; a clean close (exc None) never does.
        if exc is not None and self.client.upstream_reset(self, exc):
            return  # the app's connection went on to another instance
        self.client.server_lost()

    def pause_writing(self) -> None:  # the server reads slowly: stop reading the app
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client._paused_by_delay:
            self.client.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class PassingClientSide(ClientSide):
    """The app's connection for a database session (PostgreSQL, MySQL): a read that goes on
    unchanged, as most do once the session is under way, is written to the server as it
    came (the session's `client_pass` returns it): no copy, no `pump`, and the transport
    gets `bytes`, which uvloop writes without a memoryview. Anything else (the opening and
    authentication, TLS, denials, holds, pieces of messages) goes through `pump`."""

    session: PgSession | MySqlSession

    def server_side(self) -> PassingServerSide:
        return PassingServerSide(self)

    def data_received(self, data: bytes) -> None:
        passed = self.session.client_pass(data)
        if passed is not None:
            up = self.upstream
            # (MySQL: `up.transport` is the TLS one once `_upgrade_mysql` is done; a read is
            # passed only in the command phase, after it.)
            if up is not None and up.transport is not None and self._opening is None:
                up.transport.write(passed)
                return
            self.session.to_server += passed
        self.pump()


class PassingServerSide(ServerSide):
    """The database server's connection: what goes on to the app unchanged is written as it
    came (`server_pass`). During MySQL's TLS upgrade `_TlsStarting` hands its reads here;
    they are the connection phase's, never passed."""

    client: PassingClientSide

    def data_received(self, data: bytes) -> None:
        self.answered = True
        client = self.client
        passed = client.session.server_pass(data)
        if passed is not None:
            if client.transport is not None:
                client.transport.write(passed)
                return
            client.session.to_client += passed
        client.pump()


_TASKS: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run `coro` as a task held here until it ends (connecting upstream, routing a
    CancelRequest, MySQL's TLS upgrade), so that it cannot be collected half-way."""
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task


def _mysql_tls(side: ClientSide) -> None:
    """MySQL starts TLS mid-handshake (sidecar/mysql_handshake.py): the session has queued
    its SSLRequest, which `pump` writes before this task runs; then the upgrade."""
    _spawn(_upgrade_mysql(side))


class _TlsStarting(asyncio.Protocol):
    """The upstream's protocol during the TLS handshake: a failure is answered by
    `_upgrade_mysql` (an ERR naming the upstream), not taken for the server closing."""

    def __init__(self, up: ServerSide) -> None:
        self.up = up

    def data_received(self, data: bytes) -> None:
        self.up.data_received(data)


async def _upgrade_mysql(side: ClientSide) -> None:
    route, session = side.rt.route, side.session
    # The app may answer the greeting before `_connect` has handed the connection over
    # (`_use`, whose `pump` writes the SSLRequest): wait for that task (a reset retry starts
    # another), within the connect timeout.
    deadline = asyncio.get_running_loop().time() + route.connect_timeout
    while side.upstream is None and side._connecting and not side._closed:
        task, left = side._connect_task, deadline - asyncio.get_running_loop().time()
        if task is None or task.done() or left <= 0:
            break
        await asyncio.wait({task}, timeout=left)
    up = side.upstream
    if up is None or up.transport is None or side._closed:
        return
    assert isinstance(session, MySqlSession)
    host = side._address[0]
    try:
        transport = await asyncio.wait_for(
            asyncio.get_running_loop().start_tls(
                up.transport,
                _TlsStarting(up),
                tls_context(route.tls),
                server_hostname=route.tls.server_name or host,
            ),
            timeout=route.connect_timeout,
        )
    except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {exc.verify_message}"
        else:
            reason = describe(exc, route.connect_timeout)
        text = f"TLS to upstream {route.service} at {hp(*side._address)} failed: {reason}"
        log.warning("%s", text)
        if not side._closed:
            session.tls_failed(text)
            side.pump()
        return
    assert transport is not None
    transport.set_protocol(up)
    up.transport = transport
    if side._closed:
        up.close()
        return
    session.tls_started()
    side.pump()
