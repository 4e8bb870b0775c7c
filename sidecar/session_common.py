"""What the PostgreSQL and MySQL sessions share: route context, audit records, messages.

`PgSession` and `MySqlSession` are different state machines over different wire formats,
but they decide, account and audit alike: one `RouteContext` per route; a `Run` per decided
statement, turned into an `AuditEvent` when the server has answered it; the same texts for
denials and rate limits; SQL-level PREPARE/EXECUTE followed per session. `SessionAudit` is
the mixin that holds those methods; it adds no call on the hot path (each session called
the same methods on itself before they moved here).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from policies import limitkeys
from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Decision, LimitTicket
from policies.spec import Action
from policies.sql.inspect import SessionState
from policies.sql.mask import mask
from policies.sql.model import StatementInfo
from sidecar.audit import AuditEvent, AuditSink
from sidecar.limits import Limiter
from sidecar.protocols.postgres import DEFAULT_MAX_MESSAGE

# Masked statement texts kept per route, keyed by (session state, shape or text): masking
# is a tokenizer pass, and an app sends a few hundred distinct shapes, not millions.
MASK_CACHE_SIZE = 10_000


@dataclass(slots=True)
class RouteContext:
    """What every session of one route shares: who it serves, the decider, limits, audit."""

    app: str
    instance: str
    service: str
    decider: SqlDecider
    limiter: Limiter
    sink: AuditSink
    record_all: bool = True  # False: only decisions other than a plain allow
    full_statements: bool = False
    max_message: int = DEFAULT_MAX_MESSAGE
    policy_version: Callable[[], int] = lambda: 0
    clock: Callable[[], float] = time.time
    masks: dict[tuple[SessionState, str], str] = field(default_factory=dict)
    events: itertools.count[int] = field(default_factory=itertools.count)
    boot: str = field(default_factory=lambda: format(int(time.time() * 1000), "x"))

    @property
    def peer(self) -> Peer:
        return self.decider.peer


@dataclass(slots=True)
class Run:
    """A decided statement waiting for the server's answer (for its audit event)."""

    at: float
    started: float
    sql: str
    info: StatementInfo | None
    decision: Decision
    outcome: str  # allow | deny | reject | delay
    shape: str | None = None  # the text's constant-free shape: one masking per shape
    would: str | None = None  # what a dry-run limit would have done: reject | delay | None


class SessionAudit:
    """Audit records and session-prepared statements, for a session class to inherit.

    The session supplies `ctx`, `session_id`, `state` (how its server reads text: the mask
    cache is keyed by it), `_sql_prepared`, and the class attributes `protocol` (the audit
    event's) and `deallocate_all` (the name `DEALLOCATE ALL` is inspected as, if any).
    """

    ctx: RouteContext
    session_id: str
    state: SessionState
    protocol: str
    deallocate_all: str | None
    _sql_prepared: dict[str, StatementInfo]

    def _wants(self, decision: Decision) -> bool:
        """Whether an allowed statement with this decision gets an audit event."""
        return (
            self.ctx.record_all
            or decision.applied is not Action.ALLOW
            or decision.action is not Action.ALLOW
            or decision.audit
        )

    def _run(
        self,
        sql: str,
        info: StatementInfo | None,
        decision: Decision,
        now: float,
        outcome: str,
        *,
        force: bool = False,
        shape: str | None = None,
    ) -> Run | None:
        """The run of a statement that goes to the server (allowed or delayed): dry-run
        limit tickets are checked here, once per statement that goes ahead."""
        would = self.ctx.limiter.would(decision.dry_limits, now) if decision.dry_limits else None
        if not force and not self._wants(decision) and outcome == "allow":
            return None
        return Run(now, time.monotonic(), sql, info, decision, outcome, shape, would)

    def _each_statement(
        self,
        sql: str,
        statements: tuple[StatementInfo, ...],
        decision: Decision,
        now: float,
        outcome: str,
    ) -> list[Run | None]:
        """One run per statement of a multi-statement string, each with its own decision
        and text; all None when the string's decision is not audited. The string's dry-run
        tickets are checked once, like its enforcing ones; the verdict goes to each
        statement a dry-run limit matched."""
        would = self.ctx.limiter.would(decision.dry_limits, now) if decision.dry_limits else None
        if not self._wants(decision):
            return [None] * len(statements)
        engine, peer = self.ctx.decider.engine, self.ctx.peer
        raw = sql.encode()
        runs: list[Run | None] = []
        for info in statements:
            text = raw[info.span[0] : info.span[1]].decode() if info.span else sql
            d = engine.decide(peer, info, now)
            w = would if d.dry_limits else None
            runs.append(Run(now, time.monotonic(), text, info, d, outcome, None, w))
        return runs

    def record(self, run: Run, rows: int | None, error: str | None) -> None:
        """The server answered (or skipped) a statement: write its audit event."""
        ctx = self.ctx
        info, decision = run.info, run.decision
        event = AuditEvent(
            id=f"{ctx.instance}-{ctx.boot}-{next(ctx.events)}",
            time=run.at,
            app=ctx.app,
            instance=ctx.instance,
            service=ctx.service,
            session=self.session_id,
            protocol=self.protocol,
            decision=run.outcome,
            action=decision.action.value,
            enforced=decision.enforced,
            rules=decision.rules,
            rule=decision.rule,
            verbs=tuple(sorted(info.verbs)) if info else (),
            tables=info.tables if info else (),
            statement=self._statement_text(run.sql, run.shape),
            duration_ms=round((time.monotonic() - run.started) * 1000, 3),
            rows=rows,
            error=error,
            policy_version=ctx.policy_version(),
            would=run.would,
        )
        ctx.sink.record(event)

    def _statement_text(self, sql: str, shape: str | None) -> str:
        """The statement as the audit trail records it (literals masked unless configured)."""
        ctx = self.ctx
        if ctx.full_statements:
            return sql
        key = (self.state, shape if shape is not None else sql)
        masked = ctx.masks.get(key)
        if masked is None:
            masked = mask(sql, self.state)
            if len(ctx.masks) >= MASK_CACHE_SIZE:
                del ctx.masks[next(iter(ctx.masks))]
            ctx.masks[key] = masked
        return masked

    def _resolve(
        self, statements: tuple[StatementInfo, ...], decision: Decision, now: float
    ) -> tuple[tuple[StatementInfo, ...], Decision]:
        """Decide SQL-level EXECUTE of a statement this session prepared as that statement."""
        if not self._sql_prepared or not any(s.execute_name for s in statements):
            return statements, decision
        resolved = tuple(
            replace(self._sql_prepared[s.execute_name], span=s.span)
            if s.verb == "EXECUTE" and s.execute_name in self._sql_prepared
            else s
            for s in statements
        )
        ctx = self.ctx
        return resolved, ctx.decider.engine.decide_all(ctx.peer, resolved, now)

    def _remember_sql_prepared(self, statements: tuple[StatementInfo, ...]) -> None:
        for s in statements:
            if s.prepare_name is not None and s.body is not None:
                self._sql_prepared[s.prepare_name] = s.body
            elif s.deallocate_name is not None:
                if s.deallocate_name == self.deallocate_all:
                    self._sql_prepared.clear()
                else:
                    self._sql_prepared.pop(s.deallocate_name, None)


def deny_text(decision: Decision, info: StatementInfo | None) -> str:
    """The message of a denial: the statement's verb, the policy and rule, their message."""
    what = info.verb if info is not None and info.error is None else "statement"
    if decision.rule is not None:
        text = f"sluice: {what} denied by policy {decision.policy}, rule {decision.rule}"
        return f"{text}: {decision.message}" if decision.message else text
    return f"sluice: {what} denied by policy {decision.policy}: {decision.reason}"


def limit_text(ticket: LimitTicket) -> str:
    """The message of a rate-limit rejection; a keyed limit names the value whose bucket
    ran out (escaped and bounded as in the bucket key)."""
    limit = ticket.limit
    which = ""
    if limit.key is not None:
        name = limit.key.name
        which = f" for {name} {limitkeys.safe(ticket.value)}" if ticket.value else f" for no {name}"
    text = (
        f"sluice: rate limit {ticket.rule_id} exceeded{which} ({limit.rate:g} per {limit.per:g}s)"
    )
    return f"{text}: {ticket.message}" if ticket.message else text
