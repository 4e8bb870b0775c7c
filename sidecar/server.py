"""The sidecar's asyncio driver: listeners, upstream connections, cancel routing, reloads.

Each app connection gets a session (`PgSession`, `MySqlSession`, `HttpSession`: sans-I/O
state machines) and two asyncio Protocols around it: bytes in, the session's
`client_pass`/`server_pass` (HTTP: `client_data`/`server_data`), bytes out. A database read
the session passes unchanged is written as it came (`PassingClientSide`/`PassingServerSide`);
anything else goes out from the session's buffers (`ClientSide.pump`). Nothing else runs
per message. On uvloop when it is installed (the default), else on asyncio's loop.

What the driver owns: connecting to the upstream (with a timeout, and TLS when configured:
`sidecar/upstream_tls.py`; MySQL's mid-handshake upgrade here), telling the app when the
upstream is down (a FATAL 08006 naming the upstream), flow control in both directions,
routing CancelRequests to the server that owns the key, reloading policies, and flushing the
audit sink.

With a control plane configured (`config.control`), policies come from it instead of files
(`sidecar/control.py`: last good set from the state dir first, then a blocking-query watch),
and audit events go to the durable spool in the state dir, from which they are shipped; a
local audit log (`--audit-log`, or a sink given by the caller) is still written beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.http_decider import HttpDecider
from policies.sql.inspect import MYSQL, POSTGRES
from sidecar import builds, mysql_session, pg_session
from sidecar.audit import AuditSink, JsonlSink, MemorySink, TeeSink
from sidecar.catalog import Registration, ServiceWatch, consul_client, route_entry
from sidecar.config import Route, SidecarConfig
from sidecar.control import ControlClient, RouteInfo
from sidecar.http_session import HttpRouteContext, HttpSession
from sidecar.limits import Limiter
from sidecar.mysql_session import MySqlSession
from sidecar.pg_session import PgSession, RouteContext
from sidecar.policy_watch import PolicyWatcher
from sidecar.protocols import mysql as my
from sidecar.protocols import postgres as pg
from sidecar.quota import QuotaLimiter
from sidecar.spool import Spool
from sidecar.telemetry import Telemetry, wanted
from sidecar.upstream_tls import (
    TlsRefused,
    connect_tls,
    describe,
    hp,
    open_upstream,
    tls_context,
)
from sidecar.upstreams import Instance, Picker

log = logging.getLogger("sluice.sidecar")

CONNECTION_FAILURE = "08006"
AUDIT_FLUSH_INTERVAL = 0.2
# How often HTTP connections are checked for slow clients and idle keep-alives.
HTTP_SWEEP_INTERVAL = 1.0
# A catalog service's instances tried per app connection before the app is told it is down.
CONNECT_ATTEMPTS = 3
# At start: how long to wait for the catalog's first list of a service's instances.
CATALOG_WAIT = 5.0
# Passive health: what an app sent before a catalog instance first answered is kept (up to
# this much) so that, when that instance resets the connection, the app's connection goes
# on to the next instance with the same opening bytes (a PostgreSQL StartupMessage).
REPLAY_LIMIT = 64 * 1024


# The compiled builds of the sessions when they are current (sidecar/pg_session.py; the
# MySQL session over the compiled sidecar/mysql_responses.py), and of the PostgreSQL fast
# shape (policies/sql/pg_fastshape.py; None: libpg_query's normaliser alone).
_PG_SESSION = pg_session.session_class()
_MYSQL_SESSION = mysql_session.session_class()
_PG_FAST_SHAPE = builds.pg_fast_shape()


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when available; returns whether it is in use."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is the fallback
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


@dataclass(slots=True)
class _RouteRuntime:
    route: Route
    ctx: RouteContext | HttpRouteContext
    server: asyncio.Server | None = None
    sessions: set[ClientSide] = field(default_factory=set)
    picker: Picker | None = None  # a catalog service upstream (sidecar/upstreams.py)
    watch: ServiceWatch | None = None


class Sidecar:
    """All routes of one sidecar process, sharing one policy set, one limiter and one sink."""

    def __init__(
        self,
        config: SidecarConfig,
        sink: AuditSink | None = None,
        telemetry: Telemetry | None = None,
        listen: bool = True,
    ) -> None:
        self.config = config
        # False: no listener per route; `sluice run` accepts for them (sidecar/transparent.py).
        self.listen = listen
        self.limiter = Limiter()
        if sink is None and config.audit.path:
            sink = JsonlSink(config.audit.path)
        self.watcher: PolicyWatcher | None = None
        self.control: ControlClient | None = None
        self.spool: Spool | None = None
        engine: Engine
        if config.control is None:
            self.watcher = PolicyWatcher(config.policies)
            engine = self.watcher.engine
            self.sink: AuditSink = sink if sink is not None else MemorySink()
        else:
            if config.policies:
                log.warning(
                    "policy files %s ignored: policies come from the control plane %s",
                    ", ".join(config.policies),
                    config.control.url,
                )
            self.spool = Spool(
                os.path.join(config.control.state_dir, "spool"), config.control.spool_max_bytes
            )
            self.sink = self.spool if sink is None else TeeSink(self.spool, sink)
            self.control = ControlClient(
                config.control,
                app=config.app,
                instance=config.instance,
                spool=self.spool,
                routes=self.route_info,
                on_policies=self._use_policies,
            )
            engine = self.control.engine
            # Mesh-wide limits are leased from the control plane's quota service.
            control = self.control
            self.limiter = QuotaLimiter(config.instance, lambda: control.client)
        # Spans and metrics come from the audit events (sidecar/telemetry.py).
        if telemetry is None and wanted(config):
            telemetry = Telemetry(config)
        self.telemetry = telemetry
        if telemetry is not None:
            telemetry.metrics.watch_limiter(self.limiter)
        if telemetry is not None:
            self.sink = TeeSink(self.sink, telemetry.sink)
        self.routes: list[_RouteRuntime] = []
        # BackendKeyData -> the route and the server address that issued it
        self.cancel_keys: dict[bytes, tuple[Route, tuple[str, int]]] = {}
        self.registration: Registration | None = None
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        # One event sequence for all routes: audit ids are "<instance>-<boot>-<seq>" and
        # must be unique across the routes of one sidecar (the store drops duplicates).
        events = itertools.count()
        boot = format(int(time.time() * 1000), "x")
        for route in config.routes:
            peer = Peer(config.app, route.service, config.instance)
            picker = Picker(route.upstream_service) if route.upstream_service else None
            if route.protocol == "http":
                http = HttpRouteContext(
                    app=config.app,
                    instance=config.instance,
                    service=route.service,
                    decider=HttpDecider(engine, peer),
                    limiter=self.limiter,
                    sink=self.sink,
                    record_all=config.audit.record == "all",
                    full_paths=config.audit.full_statements,
                    policy_version=self.policy_version,
                    head_timeout=route.http.head,
                    body_timeout=route.http.body,
                    idle_timeout=route.http.idle,
                    events=events,
                    boot=boot,
                )
                self.routes.append(_RouteRuntime(route, http, picker=picker))
                continue
            if route.protocol == "mysql":
                decider = SqlDecider(engine, peer, MYSQL)
            else:
                decider = SqlDecider(engine, peer, POSTGRES, fast_shape=_PG_FAST_SHAPE)
            ctx = RouteContext(
                app=config.app,
                instance=config.instance,
                service=route.service,
                decider=decider,
                limiter=self.limiter,
                sink=self.sink,
                record_all=config.audit.record == "all",
                full_statements=config.audit.full_statements,
                policy_version=self.policy_version,
                events=events,
                boot=boot,
            )
            self.routes.append(_RouteRuntime(route, ctx, picker=picker))

    def policy_version(self) -> int:
        """The version of the policy set in force: the control plane's, or the local
        reload counter."""
        if self.control is not None:
            return self.control.version
        assert self.watcher is not None
        return self.watcher.version

    def _use_policies(self, engine: Engine, version: int) -> None:
        for rt in self.routes:
            rt.ctx.decider.use(engine)

    def route_info(self) -> list[RouteInfo]:
        out = []
        for rt, (host, port) in zip(self.routes, self.addresses(all_routes=True), strict=True):
            out.append(
                RouteInfo(
                    rt.route.service, rt.route.protocol, hp(host, port), rt.route.upstream_label
                )
            )
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.control is not None:
            await self.control.start()  # the last good set, or a bounded wait for the first
        await self._watch_catalog()
        for rt in self.routes if self.listen else ():
            host, port = rt.route.listen
            rt.server = server = await loop.create_server(
                self._factory(rt), host, port, reuse_address=True
            )
            bound = server.sockets[0].getsockname()
            log.info(
                "route %s: listening on %s:%d -> upstream %s (%s)",
                rt.route.service,
                bound[0],
                bound[1],
                rt.route.upstream_label,
                rt.route.protocol,
            )
        if self.watcher is not None:
            self._tasks.append(asyncio.create_task(self._reload_loop()))
        self._tasks.append(asyncio.create_task(self._flush_loop()))
        if any(rt.route.protocol == "http" for rt in self.routes):
            self._tasks.append(asyncio.create_task(self._http_sweep()))
        if self.telemetry is not None:
            await self.telemetry.start()
        if self.control is not None:
            self.control.start_reporting()
            if isinstance(self.limiter, QuotaLimiter):
                self._tasks.append(asyncio.create_task(self.limiter.run()))
            # The app instance, and where each route listens (for meshdns's DNS-VIP mode).
            app, instance = self.config.app, self.config.instance
            routes = [
                route_entry(app, instance, rt.route, rt.server.sockets[0].getsockname()[:2])
                for rt in self.routes
                if rt.server is not None
            ]
            self.registration = Registration(
                lambda: consul_client(self.config.control), app, instance, routes=routes
            )
            self.registration.start()

    async def _watch_catalog(self) -> None:
        """Start a catalog watch per service upstream; wait (bounded) for the first lists."""
        loop = asyncio.get_running_loop()
        first = asyncio.Event()
        pending = {rt.route.service for rt in self.routes if rt.picker is not None}
        for rt in self.routes:
            picker = rt.picker
            if picker is None:
                continue

            def changed(instances: tuple[Instance, ...], rt: _RouteRuntime = rt) -> None:
                assert rt.picker is not None
                rt.picker.update(instances)
                log.info(
                    "route %s: %s has %d healthy instance(s): %s",
                    rt.route.service,
                    rt.route.upstream_label,
                    len(instances),
                    ", ".join(map(str, instances)) or "none",
                )
                pending.discard(rt.route.service)
                if not pending:
                    first.set()

            rt.watch = ServiceWatch(
                lambda: consul_client(self.config.control), picker.service, loop, changed
            )
            rt.watch.start()
        if pending:
            try:
                await asyncio.wait_for(first.wait(), CATALOG_WAIT)
            except TimeoutError:
                log.warning(
                    "catalog: no answer within %gs for %s; connections fail until it answers",
                    CATALOG_WAIT,
                    ", ".join(sorted(pending)),
                )

    def _factory(self, rt: _RouteRuntime) -> Callable[[], ClientSide]:
        return lambda: self.client_side(rt)

    def client_side(self, rt: _RouteRuntime) -> ClientSide:
        """The protocol of a new app connection on route `rt` (also `sluice run`'s)."""
        if rt.route.protocol == "http":
            return ClientSide(self, rt)
        return PassingClientSide(self, rt)  # PostgreSQL, MySQL

    def addresses(self, all_routes: bool = False) -> list[tuple[str, int]]:
        """Where the routes listen; with `all_routes`, one per route (configured address
        for a route not listening yet)."""
        out = []
        for rt in self.routes:
            if rt.server is not None:
                name = rt.server.sockets[0].getsockname()
                out.append((name[0], name[1]))
            elif all_routes:
                out.append(rt.route.listen)
        return out

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for rt in self.routes:
            if rt.watch is not None:
                rt.watch.close()
        if self.registration is not None:
            await asyncio.to_thread(self.registration.stop)  # deregister, bounded
        for rt in self.routes:
            if rt.server is not None:
                rt.server.close()
            for side in list(rt.sessions):
                side.close()
        for rt in self.routes:
            if rt.server is not None:
                with contextlib.suppress(Exception):
                    await rt.server.wait_closed()
        if self.control is not None:
            await self.control.stop()  # ships what it can within a bounded time
        self.sink.close()
        if self.telemetry is not None:
            await self.telemetry.stop()
        self._stopped.set()

    async def _reload_loop(self) -> None:
        assert self.watcher is not None
        while True:
            await asyncio.sleep(self.config.reload_interval)
            engine = self.watcher.poll()
            if engine is not None:
                for rt in self.routes:
                    rt.ctx.decider.use(engine)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_FLUSH_INTERVAL)
            self.sink.flush()

    async def _http_sweep(self) -> None:
        """Close HTTP connections of slow clients (408) and idle keep-alives."""
        while True:
            await asyncio.sleep(HTTP_SWEEP_INTERVAL)
            now = time.monotonic()
            for rt in self.routes:
                if rt.route.protocol != "http":
                    continue
                for side in list(rt.sessions):
                    session = side.session
                    if isinstance(session, HttpSession):
                        session.check_timeouts(now)
                        if session.closing is not None:
                            side.pump()

    async def route_cancel(self, packet: bytes) -> None:
        """Send an app's CancelRequest to the server whose BackendKeyData it quotes."""
        known = self.cancel_keys.get(packet[8:])
        if known is None:
            log.info("cancel request with an unknown key ignored")
            return
        route, address = known
        try:
            _reader, writer = await asyncio.wait_for(
                open_upstream(route, address), timeout=route.connect_timeout
            )
            writer.write(packet)
            await writer.drain()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.warning("cancel request to %s:%d failed: %s", *address, exc)


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
            self.session = _MYSQL_SESSION(
                ctx, session_id, route.tls.mode, route.upstream_label, lambda: _mysql_tls(self)
            )
        else:
            self.session = _PG_SESSION(ctx, session_id)
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


async def run(config: SidecarConfig, ready: asyncio.Event | None = None) -> None:
    """Run a sidecar until SIGINT or SIGTERM."""
    sidecar = Sidecar(config)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    log.info("sidecar ready (pid %d, %s); Ctrl-C stops it", os.getpid(), builds_in_use())
    await stop.wait()
    log.info("stopping")
    await sidecar.stop()


def builds_in_use() -> str:
    """Which builds of the compiled modules the sessions run (docs/decisions/0013)."""

    def which(cls: type) -> str:
        return "compiled" if cls.__module__.endswith("_c") else "pure Python"

    shapes = "compiled" if _PG_FAST_SHAPE is not None else "libpg_query only"
    return (
        f"PostgreSQL session {which(_PG_SESSION)}, MySQL responses {which(_MYSQL_SESSION)}, "
        f"PostgreSQL fast shapes {shapes}"
    )
