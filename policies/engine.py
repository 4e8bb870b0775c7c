"""The decision engine: one pure function from (peer, request, time) to a `Decision`.

Semantics (docs/policies.md): deny overrides. A request is denied when any enforcing deny
rule matches; otherwise, when limit rules match, each must grant a token (the caller takes
them; a granted limit permits the request); otherwise it is allowed when an allow rule
matches or the default is allow. Dry-run rules (`enforce: false`) are evaluated too: the
decision reports what they would have done (`action`) beside what is applied (`applied`);
a dry-run limit rule hands over its ticket as well (`dry_limits`, a bucket of its own: key
suffix `|dry`), which the caller checks without ever refusing or holding the request.
A limit keyed by an attribute (`limit.key`) hands over one ticket per value of it in the
request (policies/limitkeys.py), all of which the caller must grant.
A statement that does not parse is denied on a destination that has any deny rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policies import limitkeys
from policies.attributes import HttpRequest, Peer
from policies.compiler import Compiled, CompiledRule, View
from policies.spec import Action, Limit, Policy, Scope
from policies.sql.model import StatementInfo
from policies.windows import Clock

_SEVERITY = {Action.ALLOW: 0, Action.LIMIT: 1, Action.DENY: 2}


@dataclass(frozen=True, slots=True)
class LimitTicket:
    """A token the caller must take before the request may proceed."""

    rule_id: str
    key: str  # the bucket: rule plus scope key (e.g. source app), plus the attribute's value
    limit: Limit
    message: str | None
    value: str = ""  # a keyed limit's attribute value, as the request had it
    # A keyed limit's bucket for values beyond the caller's cap (sidecar/limits.py); None
    # for a limit without `key`.
    overflow: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request.

    action:   the outcome with every rule counted, dry-run ones included.
    applied:  the outcome with enforcing rules only: what the sidecar does.
    enforced: action == applied (False: a dry-run rule would have changed the outcome).
    rules:    ids of every rule that matched, in policy order (dry-run and audit included).
    rule:     the id of the rule that decided `action`, or None when a default or a parse
              error decided it.
    limits:   tickets of the enforcing limit rules that matched (when `applied` is limit).
    dry_limits: tickets of the dry-run limit rules that matched (when `action` is limit):
              checked for the audit trail only (what they would have rejected or delayed).
    """

    action: Action
    applied: Action
    rules: tuple[str, ...]
    rule: str | None
    policy: str | None
    message: str | None
    reason: str
    limits: tuple[LimitTicket, ...] = ()
    audit: bool = False
    dry_limits: tuple[LimitTicket, ...] = ()

    @property
    def enforced(self) -> bool:
        return self.action is self.applied

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action.value,
            "enforced": self.enforced,
            "applied": self.applied.value,
            "rules": list(self.rules),
            "rule": self.rule,
            "policy": self.policy,
            "message": self.message,
            "reason": self.reason,
            "limits": [
                {"rule": t.rule_id, "key": t.key, "rate": t.limit.rate, "per": t.limit.per}
                for t in self.limits
            ],
            "dry_limits": [
                {"rule": t.rule_id, "key": t.key, "rate": t.limit.rate, "per": t.limit.per}
                for t in self.dry_limits
            ],
            "audit": self.audit,
        }


NO_POLICY = Decision(
    Action.ALLOW, Action.ALLOW, (), None, None, None, "no policy guards this destination"
)


class Engine:
    """Decides requests against one compiled policy set. Pure: time is an argument."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.compiled = Compiled(policies)
        self.clock = Clock()

    @property
    def policies(self) -> tuple[Policy, ...]:
        return self.compiled.policies

    def view(self, peer: Peer) -> View:
        return self.compiled.view(peer.destination, peer.source_app)

    def decide(self, peer: Peer, request: StatementInfo | HttpRequest, now: float) -> Decision:
        view = self.compiled.view(peer.destination, peer.source_app)
        if not view.policies:
            return NO_POLICY
        if isinstance(request, HttpRequest):
            candidates = view.by_method.get(request.method, view.http_any)
            matched = [r for r in candidates if r.matches_http(request, self.clock, now)]
            return _combine(peer, request, view, matched)
        if request.error is not None:
            return _unparseable(view, request.error)
        candidates = view.sql_candidates(request)
        matched = [r for r in candidates if r.matches_sql(request, self.clock, now)]
        return _combine(peer, request, view, matched)

    def decide_all(self, peer: Peer, statements: Sequence[StatementInfo], now: float) -> Decision:
        """One decision for a multi-statement string: the most severe of its statements."""
        if len(statements) == 1:
            return self.decide(peer, statements[0], now)
        if not statements:
            return self.decide(peer, StatementInfo(verb="OTHER", verbs=frozenset()), now)
        return merge([self.decide(peer, st, now) for st in statements])


def merge(decisions: Sequence[Decision]) -> Decision:
    """Combine per-statement decisions: the most severe applied outcome speaks for all."""
    worst = max(decisions, key=lambda d: (_SEVERITY[d.applied], _SEVERITY[d.action]))
    action = max((d.action for d in decisions), key=_SEVERITY.__getitem__)
    rules = tuple(dict.fromkeys(r for d in decisions for r in d.rules))
    tickets = {(t.key): t for d in decisions for t in d.limits}
    dry = {t.key: t for d in decisions for t in d.dry_limits}
    return Decision(
        action=action,
        applied=worst.applied,
        rules=rules,
        rule=worst.rule,
        policy=worst.policy,
        message=worst.message,
        reason=worst.reason,
        limits=tuple(tickets.values()) if worst.applied is Action.LIMIT else (),
        audit=any(d.audit for d in decisions),
        dry_limits=tuple(dry.values()) if worst.applied is not Action.DENY else (),
    )


def _outcome(
    matched: Sequence[CompiledRule], default: Action, dry: bool
) -> tuple[Action, list[CompiledRule]]:
    """(action, deciding rules) counting dry-run rules or not."""
    considered = matched if dry else [r for r in matched if r.rule.enforce]
    denies = [r for r in considered if r.rule.action is Action.DENY]
    if denies:
        return Action.DENY, denies[:1]
    limits = [r for r in considered if r.rule.action is Action.LIMIT]
    if limits:
        return Action.LIMIT, limits
    allows = [r for r in considered if r.rule.action is Action.ALLOW]
    if allows:
        return Action.ALLOW, allows[:1]
    return default, []


def _combine(
    peer: Peer, request: StatementInfo | HttpRequest, view: View, matched: list[CompiledRule]
) -> Decision:
    applied, by = _outcome(matched, view.default, dry=False)
    action, would = _outcome(matched, view.default, dry=True)
    deciding = would[0] if would else None
    tickets: tuple[LimitTicket, ...] = ()
    if applied is Action.LIMIT:
        tickets = tuple(t for r in by for t in _tickets(peer, request, r))
    dry: tuple[LimitTicket, ...] = ()
    if action is Action.LIMIT:  # then `would` holds every limit rule that matched
        dry = tuple(
            t for r in would if not r.rule.enforce for t in _tickets(peer, request, r, "|dry")
        )
    if deciding is not None:
        kind = "dry-run rule" if not deciding.rule.enforce else "rule"
        reason = f"{kind} {deciding.id} matched ({action.value})"
        policy, message = deciding.rule.policy, deciding.rule.message
    else:
        names = ", ".join(p.name for p in view.policies)
        reason = f"no rule matched; default {view.default.value} ({names})"
        policy, message = view.policies[0].name, None
    return Decision(
        action=action,
        applied=applied,
        rules=tuple(r.id for r in matched),
        rule=deciding.id if deciding is not None else None,
        policy=policy,
        message=message,
        reason=reason,
        limits=tickets,
        audit=any(r.rule.action is Action.AUDIT for r in matched),
        dry_limits=dry,
    )


def _unparseable(view: View, error: str) -> Decision:
    enforcing = [r for r in view.guard if r.rule.enforce]
    if not view.guard:
        # Nothing on this destination denies anything: the server will reject it anyway.
        return Decision(
            view.default,
            view.default,
            (),
            None,
            view.policies[0].name,
            None,
            f"statement does not parse ({error}); destination has no deny rule",
        )
    guard = (enforcing or list(view.guard))[0]
    reason = (
        f"statement does not parse ({error}); a destination with deny rules rejects "
        "what it cannot inspect"
    )
    applied = Action.DENY if enforcing else view.default
    return Decision(Action.DENY, applied, (), None, guard.rule.policy, None, reason)


def _tickets(
    peer: Peer, request: StatementInfo | HttpRequest, r: CompiledRule, suffix: str = ""
) -> tuple[LimitTicket, ...]:
    limit = r.rule.limit
    assert limit is not None  # the loader requires a limit for action: limit
    scope = limit.scope
    if scope is Scope.GLOBAL:
        base = r.id
    elif scope is Scope.SOURCE_APP:
        base = f"{r.id}|app={peer.source_app}"
    elif scope is Scope.SOURCE_INSTANCE:
        base = f"{r.id}|instance={peer.source_app}/{peer.source_instance}"
    else:
        base = f"{r.id}|destination={peer.destination}"
    message = r.rule.message
    key = limit.key
    if key is None:
        return (LimitTicket(r.id, base + suffix, limit, message),)
    overflow = f"{base}|{limitkeys.overflow_part(key)}{suffix}"
    return tuple(
        LimitTicket(r.id, f"{base}|{limitkeys.part(key, v)}{suffix}", limit, message, v, overflow)
        for v in limitkeys.values(key, r.rule, request)
    )
