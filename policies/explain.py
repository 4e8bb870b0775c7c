"""Why a decision came out as it did: every rule considered, matched or the condition that failed.

This is the slow, talkative twin of the engine's hot path, used by `sluice policy explain`.
It walks every rule of every policy guarding the destination (not just the indexed
candidates) and reports the engine's own decision beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.attributes import HttpRequest, Peer
from policies.compiler import CompiledRule
from policies.engine import Decision, Engine
from policies.sql.model import StatementInfo


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    id: str
    action: str
    enforce: bool
    matched: bool
    why: str  # "matched", or the first condition that failed
    file: str
    line: int

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "action": self.action,
            "enforce": self.enforce,
            "matched": self.matched,
            "why": self.why,
            "at": f"{self.file}:{self.line}",
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    verdicts: tuple[RuleVerdict, ...]


def explain(
    engine: Engine, peer: Peer, request: StatementInfo | HttpRequest, now: float
) -> Explanation:
    decision = engine.decide(peer, request, now)
    verdicts = []
    for _policy, rules in engine.compiled.rules_for(peer.destination):
        for r in rules:
            local = engine.clock.local(now, r.zone)
            why = r.why_not(peer.source_app, request, local)
            if isinstance(request, StatementInfo) and request.error is not None and why is None:
                why = "statement does not parse: no rule can match it"
                verdicts.append(_verdict(r, False, why))
                continue
            verdicts.append(_verdict(r, why is None, why or "matched"))
    return Explanation(decision, tuple(verdicts))


def _verdict(r: CompiledRule, matched: bool, why: str) -> RuleVerdict:
    rule = r.rule
    return RuleVerdict(r.id, rule.action.value, rule.enforce, matched, why, rule.file, rule.line)
