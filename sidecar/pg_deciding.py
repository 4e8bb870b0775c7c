"""The deciding half of a PostgreSQL session: what happens to a statement once found.

`sidecar/pg_session.py` frames both directions and handles what passes unchanged inline;
the rest comes here: a simple Query's statements, a Parse or Execute whose decision cannot
be reused, a FunctionCall. Each is decided with the route's `SqlDecider` and then allowed
(tracked so its answer can be matched for audit), limited (a token from the limiter, or a
delay during which the driver holds the app's input), or denied: replaced by a statement
that makes the server itself raise 42501, so the app sees exactly a server-side error
(docs/decisions/0002). `Prepared` keeps a parsed statement's last decision for the framing
loop to reuse.
"""

from __future__ import annotations

import time
from collections import deque

from policies.engine import Decision, Engine
from policies.spec import Action
from policies.sql.model import StatementInfo, parse_error
from sidecar.protocols import postgres as pg
from sidecar.session_common import Run, SessionAudit, deny_text, limit_text

DENIED = "42501"  # insufficient_privilege: what the server says for a missing GRANT
LIMITED = "53400"  # configuration_limit_exceeded

# Tracked requests, in the order the server answers them: (kind, audit run or None).
PARSE, PARSE_SWALLOW, BIND, BIND_SWALLOW, EXEC, SYNC = range(6)
Tracked = tuple[int, Run | None]
# The entries without a run, made once: most of what the FIFO holds.
PARSED: Tracked = (PARSE, None)
BOUND: Tracked = (BIND, None)
EXECUTED: Tracked = (EXEC, None)
SYNCED: Tracked = (SYNC, None)

_OPAQUE_CALL = StatementInfo(verb="CALL", verbs=frozenset({"CALL"}), opaque=True)
_UNKNOWN_PORTAL = StatementInfo(verb="EXECUTE", verbs=frozenset({"EXECUTE"}), opaque=True)
_PARSE_MEMO_SIZE = 256
_UNSETTLED = (
    "contains a backslash and was sent before the server answered earlier statements that "
    "may change how it reads backslashes (standard_conforming_strings, client_encoding)"
)


class Prepared:
    """A statement the app parsed, and its last decision: shared by every name and portal
    it was parsed or bound as, and by the Parse memo (one text, one session)."""

    __slots__ = ("decision", "engine", "minute", "plain", "slash", "sql", "statements")

    def __init__(
        self, sql: str, statements: tuple[StatementInfo, ...], decision: Decision, slash: bool
    ) -> None:
        self.sql = sql
        self.statements = statements
        self.slash = slash  # the text has a backslash: reused only when the state is settled
        self.decision = decision
        self.engine: Engine | None = None  # the decision holds for this engine ...
        self.minute = -1  # ... and this minute (-1: any minute, no rule has a time window)
        # The engine while the decision is a plain allow (an Execute then only needs its
        # answer matched), else None.
        self.plain: Engine | None = None

    def keep(self, decision: Decision, engine: Engine, minute: int) -> None:
        """Keep a decision for reuse while the engine (and, with time windows, the minute)
        stays the same."""
        statements = self.statements
        self.decision, self.engine, self.minute = decision, engine, minute
        plain = (
            decision.applied is Action.ALLOW
            and decision.action is Action.ALLOW
            and not decision.audit
            and not decision.limits
            and not decision.dry_limits
            and len(statements) == 1
            and statements[0].prepare_name is None
            and statements[0].deallocate_name is None
        )
        self.plain = engine if plain else None


class PgDeciding(SessionAudit):
    """Deciding, limiting, denying and tracking statements, for `PgSession` to inherit;
    the framing loops own the state these methods share with them."""

    to_server: bytearray
    wait: float  # > 0: the driver holds client input this long, then release()
    encoding: str
    _held: bytes | None
    _pending: deque[Tracked]
    _discarding: bool
    _statements: dict[bytes, Prepared]
    _parsed: dict[bytes, Prepared]
    _last_parse: tuple[bytes, bytes, Prepared] | None

    def _query(self, buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
        """Decide a simple Query; returns what to send instead of it (b"": nothing yet, a
        delay holds it), or None to send it unchanged."""
        raw = bytes(buf[pos + 5 : end - 1])
        ctx = self.ctx
        now = ctx.clock()
        sql, statements, decision = self._decide_text(raw, now)
        applied = decision.applied
        if applied is Action.DENY:
            return self._deny_query(raw, sql, statements, now)
        pending = self._pending
        if (
            applied is Action.ALLOW
            and decision.action is Action.ALLOW
            and not decision.audit
            and not decision.limits
            and not decision.dry_limits
            and not ctx.record_all
        ):  # a plain allow: nothing to limit or audit, only the answers to match
            for info in statements:
                if info.prepare_name is not None or info.deallocate_name is not None:
                    self._remember_sql_prepared(statements)
                    break
            if len(statements) == 1:
                pending.append(EXECUTED)
            else:
                pending.extend([EXECUTED] * len(statements))
            pending.append(SYNCED)
            return None
        outcome = "allow"
        if decision.limits:
            granted = ctx.limiter.take(decision.limits, now)
            if not granted.granted:
                assert granted.exceeded is not None
                return self._reject(sql, statements, decision, now, limit_text(granted.exceeded))
            if granted.delay > 0:
                outcome = "delay"
                self.wait = granted.delay
        self._remember_sql_prepared(statements)
        self._track_statements(sql, statements, decision, now, outcome)
        pending.append(SYNCED)
        if self.wait:
            self._held = bytes(buf[pos:end])
            return b""
        return None

    def _deny_query(
        self, raw: bytes, sql: str, statements: tuple[StatementInfo, ...], now: float
    ) -> bytes:
        """Run the statements before the first denied one, then make the server raise."""
        engine, peer = self.ctx.decider.engine, self.ctx.peer
        prefix = b""
        cut = 0
        denied_decision: Decision | None = None
        for i, info in enumerate(statements):
            d = engine.decide(peer, info, now)
            if d.applied is Action.DENY or info.span is None:
                denied_decision, cut = d, i
                break
        if denied_decision is None or denied_decision.applied is not Action.DENY:
            denied_decision = engine.decide_all(peer, statements, now)
            cut = 0
        if cut > 0:
            span = statements[cut].span
            assert span is not None
            prefix = self._prefix_bytes(raw, sql, span[0])
            allowed = statements[:cut]
            self._track_statements(
                sql, allowed, engine.decide_all(peer, allowed, now), now, "allow"
            )
        text = deny_text(denied_decision, statements[cut] if statements else None)
        raiser = pg.raise_statement(DENIED, text, detail=denied_decision.reason)
        run = Run(
            now,
            time.monotonic(),
            sql,
            statements[cut] if statements else None,
            denied_decision,
            "deny",
        )
        self._pending.append((EXEC, run))
        self._pending.append(SYNCED)
        return pg.query(prefix + self._encode(raiser))

    def _reject(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        text: str,
    ) -> bytes:
        run = Run(
            now, time.monotonic(), sql, statements[0] if statements else None, decision, "reject"
        )
        self._pending.append((EXEC, run))
        self._pending.append(SYNCED)
        return pg.query(self._encode(pg.raise_statement(LIMITED, text)))

    def _parse(self, buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
        """Decide a Parse (deny only); returns what to send instead of it, or None."""
        name, raw = pg.parse_fields(buf, pos + 5, end)
        ctx = self.ctx
        now = ctx.clock()
        engine = ctx.decider.engine
        minute = int(now // 60)
        known = self._parsed.get(raw)
        if (
            known is None
            or known.engine is not engine
            or (known.minute >= 0 and known.minute != minute)
            or (known.slash and self._pending)
        ):
            sql, statements, decision = self._decide_text(raw, now)
            known = Prepared(sql, statements, decision, b"\\" in raw)
            unsettled = known.slash and bool(self._pending)
            if not unsettled and not any(s.execute_name for s in statements):
                # Else the decision depends on the session's PREPAREs, or on answers not
                # in yet: Execute decides again (engine None: nothing to reuse).
                timeless = engine.view(ctx.peer).timeless
                known.keep(decision, engine, -1 if timeless else minute)
                if len(self._parsed) >= _PARSE_MEMO_SIZE:
                    self._forget_parsed()
                self._parsed[raw] = known
                self._last_parse = (bytes(buf[pos:end]), name, known)
        decision = known.decision
        if decision.applied is Action.DENY:
            self._statements.pop(name, None)
            info = known.statements[0] if known.statements else None
            run = Run(now, time.monotonic(), known.sql, info, decision, "deny")
            return self._inject(deny_text(decision, info), DENIED, run, decision.reason)
        self._statements[name] = known
        self._pending.append(PARSED)
        return None

    def _execute(
        self, buf: bytes | bytearray, pos: int, end: int, bound: Prepared | None
    ) -> bytes | None:
        """Decide an Execute of a portal bound to `bound` (None: a portal not seen bound);
        returns what to send instead of it (b"": nothing yet, a delay holds it), or None."""
        ctx = self.ctx
        now = ctx.clock()
        sql, statements, decision = self._decide_statement(bound, now)
        info = statements[0] if statements else None
        if decision.applied is Action.DENY:
            run = Run(now, time.monotonic(), sql, info, decision, "deny")
            return self._inject(deny_text(decision, info), DENIED, run, decision.reason)
        outcome = "allow"
        if decision.limits:
            granted = ctx.limiter.take(decision.limits, now)
            if not granted.granted:
                assert granted.exceeded is not None
                run = Run(now, time.monotonic(), sql, info, decision, "reject")
                return self._inject(limit_text(granted.exceeded), LIMITED, run, None)
            if granted.delay > 0:
                outcome = "delay"
                self.wait = granted.delay
        if info is not None and (info.prepare_name is not None or info.deallocate_name is not None):
            self._remember_sql_prepared(statements)
        self._pending.append((EXEC, self._run(sql, info, decision, now, outcome, shape=None)))
        if self.wait:
            self._held = bytes(buf[pos:end])
            return b""
        return None

    def _decide_statement(
        self, bound: Prepared | None, now: float
    ) -> tuple[str, tuple[StatementInfo, ...], Decision]:
        """Decide what a portal runs. Repeated executions of one prepared statement reuse
        the decision while the policy set is the same and, with time windows, the minute."""
        ctx = self.ctx
        engine = ctx.decider.engine
        if bound is None:  # a portal we did not see bound: decide it opaque
            return "", (_UNKNOWN_PORTAL,), engine.decide(ctx.peer, _UNKNOWN_PORTAL, now)
        sql, statements = bound.sql, bound.statements
        minute = int(now // 60)
        if bound.engine is engine and (bound.minute < 0 or bound.minute == minute):
            return sql, statements, bound.decision
        _, decision = ctx.decider.decide(sql, now, self.state)
        resolved, decision = self._resolve(statements, decision, now)
        if not any(s.execute_name for s in statements):  # not an EXECUTE of a PREPAREd one
            timeless = engine.view(ctx.peer).timeless
            bound.keep(decision, engine, -1 if timeless else minute)
        return sql, resolved, decision

    def _inject(self, text: str, code: str, run: Run, detail: str | None) -> bytes:
        """Parse/Bind/Execute of a raising statement in place of the app's message; the app's
        following messages are dropped until its Sync, as the server would drop them."""
        self._discarding = True
        self._pending.append((PARSE_SWALLOW, None))
        self._pending.append((BIND_SWALLOW, None))
        self._pending.append((EXEC, run))
        raiser = self._encode(pg.raise_statement(code, text, detail=detail))
        return pg.parse(b"", raiser) + pg.bind(b"", b"") + pg.execute(b"")

    def _function_call(self, message: bytes) -> bytes | None:
        now = self.ctx.clock()
        decision = self.ctx.decider.engine.decide(self.ctx.peer, _OPAQUE_CALL, now)
        if decision.applied is Action.DENY:
            return self._deny_query(b"", "<function call>", (_OPAQUE_CALL,), now)
        self._pending.append(
            (EXEC, self._run("<function call>", _OPAQUE_CALL, decision, now, "allow"))
        )
        self._pending.append(SYNCED)
        return None

    # -- deciding ---------------------------------------------------------------------------

    def _decide_text(
        self, raw: bytes, now: float
    ) -> tuple[str, tuple[StatementInfo, ...], Decision]:
        ctx = self.ctx
        try:
            sql = raw.decode(self.encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            bad = (parse_error(f"cannot decode the statement as {self.encoding}: {exc}"),)
            return raw.decode("latin-1"), bad, ctx.decider.engine.decide_all(ctx.peer, bad, now)
        if self._pending and b"\\" in raw:
            # Earlier statements are still unanswered and may change how the server reads
            # backslashes (standard_conforming_strings, client_encoding): fail closed.
            unsure = (parse_error(_UNSETTLED),)
            return sql, unsure, ctx.decider.engine.decide_all(ctx.peer, unsure, now)
        statements, decision = ctx.decider.decide(sql, now, self.state)
        if self._sql_prepared:
            statements, decision = self._resolve(statements, decision, now)
        return sql, statements, decision

    def _forget_parsed(self) -> None:
        self._parsed.clear()
        self._last_parse = None

    # -- audit ------------------------------------------------------------------------------

    def _track_statements(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        outcome: str,
    ) -> None:
        if not statements:
            return
        if len(statements) == 1:
            shape = self.ctx.decider.last_shape
            run = self._run(sql, statements[0], decision, now, outcome, shape=shape)
            self._pending.append((EXEC, run))
            return
        for run in self._each_statement(sql, statements, decision, now, outcome):
            self._pending.append((EXEC, run))

    # -- helpers ----------------------------------------------------------------------------

    def _encode(self, text: str) -> bytes:
        try:
            return text.encode(self.encoding, "replace")
        except LookupError:  # unknown client encoding: our own texts are ASCII-safe
            return text.encode("ascii", "replace")

    def _prefix_bytes(self, raw: bytes, sql: str, utf8_offset: int) -> bytes:
        """The bytes of `raw` before the statement at `utf8_offset` (a span start)."""
        if self.encoding == "utf-8":
            return raw[:utf8_offset]
        chars = len(sql.encode()[:utf8_offset].decode("utf-8", "ignore"))
        return self._encode(sql[:chars])
