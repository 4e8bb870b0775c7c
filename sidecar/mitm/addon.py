"""The Sluice policy addon for mitmproxy: the same policies on HTTPS to external services,
HTTP/2 and WebSocket, where mitmproxy is strong (its certificate authority, its protocol
stack, its inspection tools). Plaintext HTTP/1.1 takes the default path
(`sidecar/http_session.py`), which is about a hundred times faster. Loaded by the script
`sidecar/mitm_addon.py`:

    mitmdump -s sidecar/mitm_addon.py --set sluice_app=billing \\
        --set sluice_policies=examples/policies --set sluice_audit_log=audit.jsonl

Per request the addon builds the attributes the plaintext path builds (method; host from
the Host header or the HTTP/2 :authority, lower-cased; the path normalised by
`protocols/http1.normalize_target`, which is also the path sent upstream; headers when a
rule of the route reads them) and asks an `HttpDecider` over the engine that
`PolicyWatcher` keeps current (an edit reloads; a bad edit keeps the last good set). It
answers as the plaintext path does: 403 with the same JSON body, 429 with Retry-After, a
held request for `on_exceed: delay`, 400 for a target that cannot be normalised; dry-run
rules forward and are audited as would-deny, and `sluice_inspect` makes every rule a dry
run. A WebSocket is decided on the request that upgrades it.

Decisions are taken in `requestheaders`, when the head is complete and before the body is
read, as the plaintext session decides on `on_headers_complete`: by the `request` hook a
streamed body (`stream_large_bodies`) would already be on its way upstream. Each request
becomes one audit event when it is answered (`response`) or fails (`error`), with protocol
"http", "http2", "http3" or "websocket" (`flowinfo.protocol`; docs/decisions/0010).

mitmproxy lives in a virtualenv of its own (`.venv-mitm`, `make mitm`) that has no httpx,
fastapi, uvicorn, redis or opentelemetry: nothing imported here may need them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, exceptions, http

from policies.attributes import Peer
from policies.engine import Decision
from policies.errors import PolicyError
from policies.http_decider import HttpDecider
from policies.spec import Action
from sidecar.audit import AuditEvent, JsonlSink
from sidecar.limits import Limiter
from sidecar.mitm.flowinfo import (
    ServiceMap,
    may_have_body,
    protocol,
    request_size,
    response_size,
)
from sidecar.policy_watch import PolicyWatcher
from sidecar.protocols.http1 import BadRequest, denial, json_body, limit_answer, normalize_target

log = logging.getLogger("sluice.mitm")

RELOAD_INTERVAL = 0.5  # seconds between policy file checks (the sidecar's default)
FLUSH_INTERVAL = 0.2  # seconds between audit flushes (the sidecar's AUDIT_FLUSH_INTERVAL)
# One decider per destination service; in regular mode the hosts are whatever apps reach.
MAX_DECIDERS = 1024
# Flows decided and not yet answered; a flow that never ends cannot grow this for ever.
MAX_PENDING = 65536


@dataclass(slots=True)
class _Pending:
    """A decided request waiting for its answer: what its audit event will say."""

    at: float  # UNIX time of the decision
    started: float  # monotonic time of the decision
    protocol: str
    service: str
    method: str
    host: str
    path: str | None  # None: the target could not be normalised
    decision: Decision | None  # None: nothing was decided (a bad target, no policies)
    outcome: str  # allow | deny | reject | delay
    action: str
    enforced: bool
    would: str | None = None
    status: int | None = None  # our own answer's status, when we answered


class SluiceAddon:
    """Decides every request mitmproxy carries and audits it (see the module docstring)."""

    def __init__(self) -> None:
        self.watcher: PolicyWatcher | None = None
        self.problem: str | None = "not configured yet"  # set: every request gets 503
        self.sink: JsonlSink | None = None
        self.limiter = Limiter()
        self.deciders: dict[str, HttpDecider] = {}
        self.pending: dict[str, _Pending] = {}
        self.app = ""
        self.instance = ""
        self.services = ServiceMap()
        self.record_all = True
        self.full_paths = False
        self.inspect = False
        self.events = itertools.count()
        self.boot = format(int(time.time() * 1000), "x")
        self._task: asyncio.Task[None] | None = None

    # lifecycle

    def load(self, loader: Any) -> None:
        add = loader.add_option
        add("sluice_app", str, "", "Sluice: the source app whose traffic this proxy carries.")
        add("sluice_instance", str, "", "Sluice: this instance's name (default: sluice_app).")
        add(
            "sluice_service",
            str,
            "",
            "Sluice: the destination service of every request (default: sluice_services, "
            "else the request host's first label).",
        )
        add(
            "sluice_services",
            Sequence[str],
            [],
            "Sluice: HOSTGLOB=SERVICE, the destination service of requests to matching hosts "
            "(case-insensitive, port ignored, first match wins).",
        )
        add("sluice_policies", Sequence[str], [], "Sluice: policy files or directories.")
        add("sluice_audit_log", str, "", "Sluice: append audit events to this JSON-lines file.")
        add(
            "sluice_audit",
            str,
            "all",
            "Sluice: which decisions to audit.",
            choices=["all", "non-allow"],
        )
        add("sluice_full_paths", bool, False, "Sluice: audit paths with their query strings.")
        add(
            "sluice_inspect",
            bool,
            False,
            "Sluice: inspection mode: decide and audit every request, enforce nothing "
            "(every deny is audited as would-deny).",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("sluice_") for name in updated):
            return
        opts = ctx.options
        try:
            self._configure(opts, updated)
        except exceptions.OptionsError as exc:
            # mitmproxy logs a script's configure error and keeps the script: fail closed.
            self.problem = str(exc)
            raise
        self.problem = None

    def _configure(self, opts: Any, updated: set[str]) -> None:
        if not opts.sluice_app:
            raise exceptions.OptionsError("sluice_app is required: the app this proxy serves")
        self.app = str(opts.sluice_app)
        self.instance = str(opts.sluice_instance or opts.sluice_app)
        try:
            self.services = ServiceMap.parse(
                str(opts.sluice_service), [str(i) for i in opts.sluice_services]
            )
        except ValueError as exc:
            raise exceptions.OptionsError(f"sluice_services: {exc}") from None
        self.record_all = opts.sluice_audit == "all"
        self.full_paths = bool(opts.sluice_full_paths)
        self.inspect = bool(opts.sluice_inspect)
        if "sluice_policies" in updated or self.watcher is None:
            try:
                self.watcher = PolicyWatcher([str(p) for p in opts.sluice_policies])
            except PolicyError as exc:
                self.watcher = None
                raise exceptions.OptionsError(f"sluice_policies: {exc}") from None
        self.deciders.clear()  # the peer (app, instance, service) or the engine may differ
        if "sluice_audit_log" in updated:
            if self.sink is not None:
                self.sink.close()
            self.sink = JsonlSink(opts.sluice_audit_log) if opts.sluice_audit_log else None
        log.info(
            "sluice: app %s, %d policies (version %d)%s",
            self.app,
            len(self.watcher.engine.policies),
            self.watcher.version,
            ", inspection mode: nothing enforced" if self.inspect else "",
        )

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.sink is not None:
            self.sink.close()

    async def _tick(self) -> None:
        """Reload edited policies and flush the audit log, until the addon is done."""
        last_poll = 0.0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            now = time.monotonic()
            if self.watcher is not None and now - last_poll >= RELOAD_INTERVAL:
                last_poll = now
                engine = self.watcher.poll()
                if engine is not None:
                    for decider in self.deciders.values():
                        decider.use(engine)
            if self.sink is not None:
                self.sink.flush()

    # deciding

    def requestheaders(self, flow: Any) -> Awaitable[None] | None:
        req = flow.request
        now = time.time()
        method = str(req.method)
        host = str(req.host_header or req.host or "").strip().lower()
        service = self.services.service(host)
        p = _Pending(
            now, time.monotonic(), protocol(req), service, method, host, None, None, "deny",
            "deny", True,
        )  # fmt: skip
        self._remember(flow, p)
        if self.problem is not None or self.watcher is None:
            body = {"error": "unavailable", "message": f"sluice: not enforcing: {self.problem}"}
            self._answer(flow, p, 503, body)
            return None
        try:
            target = normalize_target(req.data.path)
        except BadRequest as exc:
            if self.inspect:  # undecidable, and nothing is enforced: forward it
                p.outcome, p.enforced = "allow", False
                return None
            self._answer(flow, p, exc.status, {"error": "bad request", "message": f"sluice: {exc}"})
            return None
        forward = target.forward
        if forward != req.data.path:
            req.data.path = forward  # the server acts on the path that was decided
        p.path = (
            f"{target.path}?{target.query}" if self.full_paths and target.query else target.path
        )
        decider = self._decider(service)
        names = decider.header_names
        if names:  # only the headers some rule reads (the decision cache's key)
            headers = tuple(
                (low, v.strip())
                for k, v in req.headers.items(multi=True)
                if (low := k.lower()) in names
            )
            decision = decider.decide(method, host, target.path, now, headers)
        else:
            decision = decider.decide(method, host, target.path, now)
        p.decision = decision
        p.outcome, p.action, p.enforced = "allow", decision.action.value, decision.enforced
        flow.metadata["sluice"] = {"action": p.action, "rule": decision.rule}
        limiter = self.limiter
        if decision.dry_limits:
            p.would = limiter.would(decision.dry_limits, now)
        applied = decision.applied
        if applied is Action.DENY:
            if self.inspect:
                p.enforced = False
            else:
                p.outcome = "deny"
                self._answer(flow, p, 403, denial(decision))
        elif applied is Action.LIMIT:
            if self.inspect:
                would = limiter.would(decision.limits, now)
                if would is not None:
                    p.would, p.enforced = would, False
                return None
            granted = limiter.take(decision.limits, now)
            if not granted.granted:
                assert granted.exceeded is not None
                answer, retry = limit_answer(granted.exceeded)
                p.outcome = "reject"
                self._answer(flow, p, 429, answer, ("Retry-After", str(retry)))
            elif granted.delay > 0:
                p.outcome = "delay"
                return asyncio.sleep(granted.delay)
        return None

    def _decider(self, service: str) -> HttpDecider:
        decider = self.deciders.get(service)
        if decider is None:
            assert self.watcher is not None
            if len(self.deciders) >= MAX_DECIDERS:
                self.deciders.clear()
            peer = Peer(self.app, service, self.instance)
            decider = self.deciders[service] = HttpDecider(self.watcher.engine, peer)
        return decider

    def _remember(self, flow: Any, p: _Pending) -> None:
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            del pending[next(iter(pending))]
        pending[flow.id] = p

    def _answer(
        self,
        flow: Any,
        p: _Pending,
        status: int,
        body: Mapping[str, object],
        *extra: tuple[str, str],
    ) -> None:
        """Answer the request ourselves instead of the server."""
        p.status = status
        req = flow.request
        if req.stream or (ctx.options.stream_large_bodies and may_have_body(req)):
            # mitmproxy cannot both answer and stream a large body (it raises): the app's
            # connection is reset instead, and the audit event still says what was decided.
            flow.kill()
            return
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        headers.update(extra)
        flow.response = http.Response.make(status, json_body(body), headers)

    # auditing

    def response(self, flow: Any) -> None:
        p = self.pending.pop(flow.id, None)
        if p is not None:
            self._record(flow, p, int(flow.response.status_code))

    def error(self, flow: Any) -> None:
        p = self.pending.pop(flow.id, None)
        if p is None:
            return
        status = p.status
        if status is None and flow.response is not None:
            status = int(flow.response.status_code)
        elif status is None and flow.request.timestamp_end is not None:
            status = 502  # the request was read; mitmproxy answers the app 502 for the server
        self._record(flow, p, status)

    def _record(self, flow: Any, p: _Pending, status: int | None) -> None:
        sink = self.sink
        if sink is None:
            return
        decision = p.decision
        if (
            not self.record_all
            and p.outcome == "allow"
            and decision is not None
            and decision.action is Action.ALLOW
            and not decision.audit
            and p.would is None
        ):
            return
        method = p.method
        sink.record(
            AuditEvent(
                id=f"{self.instance}-{self.boot}-{next(self.events)}",
                time=p.at,
                app=self.app,
                instance=self.instance,
                service=p.service,
                session=str(flow.client_conn.id),
                protocol=p.protocol,
                decision=p.outcome,
                action=p.action,
                enforced=p.enforced,
                rules=decision.rules if decision else (),
                rule=decision.rule if decision else None,
                verbs=(method,),
                tables=(),
                statement=f"{method} {p.path}" if p.path is not None else f"{method} (bad target)",
                duration_ms=round((time.monotonic() - p.started) * 1000, 3),
                policy_version=self.watcher.version if self.watcher else 0,
                would=p.would,
                method=method,
                host=p.host or None,
                path=p.path,
                status=status,
                bytes_in=request_size(flow.request),
                bytes_out=response_size(flow.response) if flow.response is not None else 0,
            )
        )
