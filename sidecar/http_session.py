"""One HTTP/1.1 connection through the sidecar: the sans-I/O state machine.

The driver (`sidecar/connection.py`) feeds the app's bytes to `client_data` and the server's to
`server_data`, then writes out `to_server` and `to_client`, exactly as for the SQL sessions.

Every request is decided when its head is complete (httptools calls `on_headers_complete`):
- allowed: the head is forwarded rebuilt, with the normalised target that was decided
  (`protocols/http1.normalize_target`), and the body follows as it arrives (a chunked body
  is re-chunked from the decoded data, so the server frames exactly what was parsed);
- denied: 403 with a JSON body naming the policy and rule; the body, if any, is read and
  dropped and the connection stays open;
- over a limit: 429 with Retry-After, or the request is held for the delay (`wait`);
- malformed: 400 (431 for oversized headers, 414 for a long target) and the connection
  closes, as RFC 9112 asks after a framing error.

Pipelined requests are answered in order: the sidecar's own answers wait in one FIFO behind
the server's responses to earlier requests (`ResponseFramer` says where each one ends). The
upstream connection mirrors the app's: it is opened on the first forwarded request and, when
the server closes it between requests, opened again for the next one. A 101 response turns
the connection into a tunnel (WebSocket and other upgrades). Each answered request becomes
an audit event with method, host, path, status, bytes and duration.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httptools

from policies.engine import Decision
from policies.http_decider import HttpDecider
from policies.spec import Action
from sidecar.audit import AuditEvent, AuditSink
from sidecar.limits import Limiter
from sidecar.protocols.http1 import (
    MAX_HEAD,
    MAX_TARGET,
    STATUS_TEXT,
    BadRequest,
    ResponseFramer,
    UpstreamError,
    denial,
    limit_answer,
    local_response,
    normalize_target,
)

# Slow clients cannot hold a connection: a request head must arrive within HEAD_TIMEOUT of
# its first byte (slowloris), a body may not stall longer than BODY_TIMEOUT, and a
# keep-alive connection idle for IDLE_TIMEOUT is closed (nginx: 60 s, 60 s, 75 s). Routes
# set their own (sidecar/config.py HttpTimeouts).
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0

_FORWARD, _DISCARD = 0, 1
# Connection states: reading HTTP; an upgrade forwarded, waiting for 101; a tunnel; input
# no longer read (a request we could not parse; the connection closes once answered).
_HTTP, _AWAIT_UPGRADE, _TUNNEL, _DRAIN = range(4)


@dataclass(slots=True)
class HttpRouteContext:
    """What every connection of one HTTP route shares: who it serves, decider, limits."""

    app: str
    instance: str
    service: str
    decider: HttpDecider
    limiter: Limiter
    sink: AuditSink
    record_all: bool = True  # False: only decisions other than a plain allow
    full_paths: bool = False  # audit paths with their query strings
    policy_version: Callable[[], int] = lambda: 0
    clock: Callable[[], float] = time.time
    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    events: itertools.count[int] = field(default_factory=itertools.count)
    boot: str = field(default_factory=lambda: format(int(time.time() * 1000), "x"))


@dataclass(slots=True)
class _Pending:
    """A request waiting for its answer: the server's (`local` None) or ours."""

    local: bytes | None
    head: bool  # a HEAD request: its response has no body
    close: bool  # close the connection once it is answered
    # The audit record (None: not audited): when, what, and the decision.
    at: float
    started: float
    method: str
    host: str
    path: str
    decision: Decision | None
    outcome: str
    would: str | None
    bytes_in: int
    status: int = 0


class HttpSession:
    protocol = "http"

    def __init__(self, ctx: HttpRouteContext, session_id: str) -> None:
        self.ctx = ctx
        self.session_id = session_id
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.closing: str | None = None  # set: close both sides once output is flushed
        self.startup_sent = False  # a request is waiting for the upstream connection
        self.cancel_packet: bytes | None = None  # (PostgreSQL only; the driver reads it)
        self.backend_key: bytes | None = None
        self.wait = 0.0  # > 0: the driver holds client input this long, then release()
        self._held: bytearray | None = None  # requests held for a delay, in order
        self._parser = httptools.HttpRequestParser(self)
        self._framer = ResponseFramer()
        self._pending: deque[_Pending] = deque()
        self._state = _HTTP
        self._tunnel_buf = bytearray()
        self._upgrade_allowed = False
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._mode = _FORWARD
        self._chunked = False
        self._cur: _Pending | None = None
        self._error: BadRequest | None = None
        self._started = 0.0  # monotonic time of the first byte of the request being read
        self._in_body = False
        self._last = time.monotonic()  # last byte from the app or answer to it
        self._heads = 0  # HEAD requests pending an upstream response

    # bytes from the app

    def client_data(self, data: bytes) -> None:
        self._last = now = time.monotonic()
        if not self._started and not self._in_body:
            self._started = now  # the first byte of a request head: its clock starts
        if self.closing is not None:
            return
        if self._state != _HTTP:
            if self._state == _TUNNEL:
                self.to_server += data
            elif self._state == _AWAIT_UPGRADE:
                self._tunnel_buf += data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
        except httptools.HttpParserCallbackError:
            error = self._error or BadRequest(400, "the request could not be handled")
            self._refuse(error.status, error.reason)
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed request: {exc}")

    def release(self) -> None:
        """The delay is over: the held requests go to the server."""
        held, self._held, self.wait = self._held, None, 0.0
        if held:
            self.to_server += held
            self.startup_sent = True

    # httptools callbacks (the request being parsed)

    # (No on_message_begin: one Python call less per request. The request's fields are
    # reset when the previous one completes, and its head clock starts in client_data.)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            self._error = BadRequest(414, f"request target longer than {MAX_TARGET} bytes")
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            self._error = BadRequest(431, f"request headers larger than {MAX_HEAD} bytes")
            raise self._error
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        try:
            self._decide()
        except BadRequest as exc:
            self._error = exc
            raise
        self._started = 0.0
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        cur = self._cur
        assert cur is not None
        cur.bytes_in += len(body)
        if self._mode == _FORWARD:
            out = self._held if self._held is not None else self.to_server
            if self._chunked:
                out += b"%x\r\n" % len(body)
                out += body
                out += b"\r\n"
            else:
                out += body

    def on_message_complete(self) -> None:
        if self._mode == _FORWARD and self._chunked:
            out = self._held if self._held is not None else self.to_server
            out += b"0\r\n\r\n"
        self._cur = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._in_body = False
        self._started = 0.0
        self._url = b""
        self._headers = []
        self._head_size = 0

    # deciding

    def _decide(self) -> None:
        parser = self._parser
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            raise BadRequest(405, "CONNECT is not served: the sidecar fronts one service")
        target = normalize_target(self._url)
        host = target.host
        chunked = False
        for name, value in self._headers:
            if len(name) == 4 and name.lower() == b"host" and host is None:
                host = value.decode("latin-1").strip().lower()
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                chunked = value.rstrip().lower().endswith(b"chunked")
        version = parser.get_http_version()
        if host is None:
            if version != "1.0":
                raise BadRequest(400, "HTTP/1.1 requests need a Host header")
            host = ""
        ctx = self.ctx
        decider = ctx.decider
        now = ctx.clock()
        names = decider.header_names_b
        if names:  # only the headers some rule reads: the decision depends on nothing else
            headers = tuple(
                (low.decode("latin-1"), v.decode("latin-1").strip())
                for n, v in self._headers
                if (low := n.lower()) in names
            )
            decision = decider.decide(method, host, target.path, now, headers)
        else:
            decision = decider.decide(method, host, target.path, now)
        keep = parser.should_keep_alive()
        head = method == "HEAD"
        path = target.path
        if ctx.full_paths and target.query:
            path = f"{path}?{target.query}"
        cur = _Pending(
            None, head, not keep, now, time.monotonic(), method, host, path, decision, "allow",
            None, len(self._url) + self._head_size,
        )  # fmt: skip
        self._cur = cur
        self._chunked = chunked
        applied = decision.applied
        limiter = ctx.limiter
        if decision.dry_limits:
            cur.would = limiter.would(decision.dry_limits, now)
        if applied is Action.DENY:
            self._answer(cur, 403, denial(decision), "deny")
            return
        if applied is Action.LIMIT:
            granted = limiter.take(decision.limits, now)
            if not granted.granted:
                ticket = granted.exceeded
                assert ticket is not None
                body, retry = limit_answer(ticket)
                self._answer(cur, 429, body, "reject", extra=(("Retry-After", str(retry)),))
                return
            if granted.delay > 0:
                cur.outcome = "delay"
                if self._held is None:
                    self._held = bytearray()
                self.wait = max(self.wait, granted.delay)
        self._mode = _FORWARD
        if head:
            self._heads += 1
        if parser.should_upgrade():
            self._upgrade_allowed = True
        self._pending.append(cur)
        parts = [method.encode(), b" ", target.forward, b" HTTP/", version.encode(), b"\r\n"]
        for name, value in self._headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if self._held is not None:
            self._held += b"".join(parts)
        else:
            self.to_server += b"".join(parts)
            self.startup_sent = True

    def _answer(
        self,
        cur: _Pending,
        status: int,
        body: Mapping[str, object],
        outcome: str,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Answer the current request ourselves, in its turn; its body is dropped."""
        self._mode = _DISCARD
        cur.outcome = outcome
        cur.status = status
        cur.local = local_response(status, body, close=cur.close, extra=extra)
        self._pending.append(cur)
        self._flush_local()

    def _flush_local(self) -> None:
        """Send our answers that are next in turn (no server response due before them)."""
        pending = self._pending
        while pending and pending[0].local is not None:
            p = pending.popleft()
            assert p.local is not None
            self.to_client += p.local
            self._record(p, len(p.local))
            if p.close:
                self.closing = "the app asked to close the connection"
                return

    def _upgraded(self, rest: bytes) -> None:
        """An Upgrade (or CONNECT) request was read: wait for the server's 101 when it was
        forwarded; otherwise go on reading HTTP after our answer."""
        if self.closing is not None:
            return
        if self._upgrade_allowed:
            self._upgrade_allowed = False
            self._state = _AWAIT_UPGRADE
            self._tunnel_buf += rest
            return
        self._parser = httptools.HttpRequestParser(self)
        self._reset_request()
        if rest:
            self.client_data(rest)

    def _refuse(self, status: int, reason: str) -> None:
        """A request we cannot read: answer in turn and close (RFC 9112 section 11.2)."""
        cur = _Pending(
            None, False, True, self.ctx.clock(), time.monotonic(), "", "", "", None, "deny",
            None, len(self._url) + self._head_size,
        )  # fmt: skip
        error = STATUS_TEXT.get(status, "Bad Request").lower()
        body = {"error": error, "message": f"sluice: {reason}"}
        self._answer(cur, status, body, "deny")
        self._state = _DRAIN  # read nothing more; close once answered in turn

    # bytes from the server

    def server_data(self, data: bytes) -> None:
        if self._state == _TUNNEL:
            self.to_client += data
            return
        if not self._pending:
            self._bad_gateway("the server sent data with no request outstanding")
            return
        try:
            done = self._framer.feed(data, self._is_head)
        except UpstreamError as exc:
            self._bad_gateway(str(exc))
            return
        if not done:
            self.to_client += data
            return
        self._completed(data, done)

    def _is_head(self, k: int) -> bool:
        """Whether the k-th response from now answers a HEAD request."""
        if not self._heads:
            return False
        forwarded = [p for p in self._pending if p.local is None]
        return k < len(forwarded) and forwarded[k].head

    def _completed(self, data: bytes, done: int) -> None:
        framer = self._framer
        ends = framer.ends
        if done == 1 and ends[0] == len(data) and not framer.tunnel:
            # The common case: one response, ending with this read.
            self.to_client += data
            p = self._pending.popleft()
            p.status = framer.statuses[0]
            if p.head:
                self._heads -= 1
            self._record(p, framer.sizes[0])
            ends.clear()
            framer.statuses.clear()
            framer.sizes.clear()
            if self._pending:
                self._flush_local()
            self._last = time.monotonic()
            if self._state == _AWAIT_UPGRADE and not self._pending:
                self._resume_http()
            return
        start = 0
        for i in range(done):
            end = ends[i]
            self.to_client += data[start:end]
            start = end
            p = self._pending.popleft()
            p.status = framer.statuses[i]
            if p.head:
                self._heads -= 1
            self._record(p, framer.sizes[i])
            self._flush_local()
        framer.ends.clear()
        framer.statuses.clear()
        framer.sizes.clear()
        if start < len(data):
            self.to_client += data[start:]
        self._last = time.monotonic()
        if framer.tunnel:
            self._state = _TUNNEL
            self.to_server += self._tunnel_buf
            self._tunnel_buf = bytearray()
        elif self._state == _AWAIT_UPGRADE and not self._pending:
            self._resume_http()

    def _resume_http(self) -> None:
        """The server declined the upgrade: read HTTP again, from what the app sent since."""
        if self.closing is not None:
            return
        self._state = _HTTP
        self._parser = httptools.HttpRequestParser(self)
        self._reset_request()
        rest, self._tunnel_buf = bytes(self._tunnel_buf), bytearray()
        if rest:
            self.client_data(rest)

    def upstream_closed(self) -> bool:
        """The server closed its side. True: close the app's connection too (after what is
        queued); False: the connection was idle, the next request opens a new one."""
        self.startup_sent = False
        if self._state == _TUNNEL:
            return True
        if self._framer.closed():  # that ended a close-delimited response
            self._completed(b"", 1)
            return True
        if not any(p.local is None for p in self._pending) and self._framer.idle:
            self._framer = ResponseFramer()
            return False
        self._bad_gateway("the server closed the connection before answering")
        return True

    def upstream_failed(self, reason: str) -> None:
        """The upstream could not be reached: 502 for the request waiting on it."""
        self._bad_gateway(reason)

    def _bad_gateway(self, reason: str) -> None:
        """Answer the first request waiting on the server with 502 and close."""
        self.startup_sent = False
        if self.closing is not None:
            return
        body = {"error": "bad gateway", "service": self.ctx.service, "message": f"sluice: {reason}"}
        response = local_response(502, body, close=True)
        forwarded = next((p for p in self._pending if p.local is None), None)
        if forwarded is not None and self._framer.idle:
            self.to_client += response
            forwarded.status = 502
            self._record(forwarded, len(response))
        elif forwarded is None:
            self.to_client += response
        self.closing = f"upstream: {reason}"

    # timeouts

    def check_timeouts(self, now: float) -> None:
        """Called about once a second by the driver (monotonic `now`)."""
        if self.closing is not None or self._state == _TUNNEL:
            return
        ctx = self.ctx
        if self._started and now - self._started > ctx.head_timeout:
            self._timeout(f"no complete request head within {ctx.head_timeout:g}s")
        elif self._in_body and now - self._last > ctx.body_timeout:
            self._timeout(f"the request body stalled for {ctx.body_timeout:g}s")
        elif not self._pending and not self._in_body and now - self._last > ctx.idle_timeout:
            self.closing = "idle keep-alive connection"

    def _timeout(self, reason: str) -> None:
        if self._pending:  # answers are still due: just close
            self.closing = reason
            return
        body = {"error": "request timeout", "message": f"sluice: {reason}"}
        self.to_client += local_response(408, body, close=True)
        self.closing = reason

    # audit

    def _record(self, p: _Pending, bytes_out: int) -> None:
        decision = p.decision
        ctx = self.ctx
        if (
            decision is not None
            and not ctx.record_all
            and p.outcome == "allow"
            and decision.action is Action.ALLOW
            and decision.applied is Action.ALLOW
            and not decision.audit
            and p.would is None
        ):
            return
        ctx.sink.record(
            AuditEvent(
                id=f"{ctx.instance}-{ctx.boot}-{next(ctx.events)}",
                time=p.at,
                app=ctx.app,
                instance=ctx.instance,
                service=ctx.service,
                session=self.session_id,
                protocol="http",
                decision=p.outcome,
                action=decision.action.value if decision else "deny",
                enforced=decision.enforced if decision else True,
                rules=decision.rules if decision else (),
                rule=decision.rule if decision else None,
                verbs=(p.method,) if p.method else (),
                tables=(),
                statement=f"{p.method} {p.path}" if p.method else "(malformed request)",
                duration_ms=round((time.monotonic() - p.started) * 1000, 3),
                policy_version=ctx.policy_version(),
                would=p.would,
                method=p.method or None,
                host=p.host or None,
                path=p.path or None,
                status=p.status,
                bytes_in=p.bytes_in,
                bytes_out=bytes_out,
            )
        )
