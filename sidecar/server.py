"""The sidecar's asyncio driver: routes and listeners, cancel routing, reloads, audit.

Each app connection gets a session (`PgSession`, `MySqlSession`, `HttpSession`: sans-I/O
state machines) and two asyncio Protocols around it (`sidecar/connection.py`): bytes in, the
session's `client_pass`/`server_pass` (HTTP: `client_data`/`server_data`), bytes out; a
database read the session passes unchanged is written as it came. Nothing else runs per
message. On uvloop when it is installed (the default), else on asyncio's loop.

What this module owns: the routes (their contexts, listeners and catalog watches), routing
CancelRequests to the server that owns the key, reloading policies, flushing the audit sink
and the sweep of slow HTTP connections. Each connection's own work (connecting upstream
with a timeout and TLS, telling the app when the upstream is down, flow control, MySQL's
mid-handshake TLS upgrade) is `sidecar/connection.py`'s.

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
from collections.abc import Callable
from dataclasses import dataclass, field

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.http_decider import HttpDecider
from policies.sql.inspect import MYSQL, POSTGRES
from sidecar import builds
from sidecar.audit import AuditSink, JsonlSink, MemorySink, TeeSink
from sidecar.catalog import Registration, ServiceWatch, consul_client, route_entry
from sidecar.config import Route, SidecarConfig
from sidecar.connection import MYSQL_SESSION, PG_SESSION, ClientSide, PassingClientSide
from sidecar.control import ControlClient, RouteInfo
from sidecar.http_session import HttpRouteContext, HttpSession
from sidecar.limits import Limiter
from sidecar.pg_session import RouteContext
from sidecar.policy_watch import PolicyWatcher
from sidecar.quota import QuotaLimiter
from sidecar.spool import Spool
from sidecar.telemetry import Telemetry, wanted
from sidecar.upstream_tls import (
    hp,
    open_upstream,
)
from sidecar.upstreams import Instance, Picker

log = logging.getLogger("sluice.sidecar")

AUDIT_FLUSH_INTERVAL = 0.2
# How often HTTP connections are checked for slow clients and idle keep-alives.
HTTP_SWEEP_INTERVAL = 1.0
# At start: how long to wait for the catalog's first list of a service's instances.
CATALOG_WAIT = 5.0


# The compiled build of the PostgreSQL fast shape when it is current
# (policies/sql/pg_fastshape.py; None: libpg_query's normaliser alone).
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
        f"PostgreSQL session {which(PG_SESSION)}, MySQL responses {which(MYSQL_SESSION)}, "
        f"PostgreSQL fast shapes {shapes}"
    )
