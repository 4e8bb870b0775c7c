"""The validated policy model: what a YAML policy document means, before compilation.

Values here are immutable and already checked; `policies.loader` builds them from YAML and
`policies.compiler` turns a set of them into the indexed matchers the engine uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from zoneinfo import ZoneInfo

from policies.globs import NameSet, TableSet
from policies.windows import Window


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    LIMIT = "limit"
    AUDIT = "audit"  # record the decision; changes nothing else


class Scope(StrEnum):
    """What one token bucket is shared by."""

    GLOBAL = "global"  # one bucket per rule, all sources together
    SOURCE_APP = "source-app"  # one per source app, summed over all of its instances
    SOURCE_INSTANCE = "source-instance"  # one per app instance
    DESTINATION = "destination"  # one per destination service (useful with a glob destination)


class OnExceed(StrEnum):
    REJECT = "reject"
    DELAY = "delay"


class KeyAttribute(StrEnum):
    """A request attribute a limit can be keyed by: one bucket per value, within the scope."""

    TABLE = "table"  # SQL: each table the rule is about (bare relation name, lower-cased)
    VERB = "verb"  # SQL: each verb the rule is about
    METHOD = "method"  # HTTP
    PATH = "path"  # HTTP: the normalised path, without the query
    HOST = "host"  # HTTP: lower-cased, without the port
    HEADER = "header"  # HTTP: each value of one header (`header:<name>`)

    @property
    def sql(self) -> bool:
        return self in (KeyAttribute.TABLE, KeyAttribute.VERB)


@dataclass(frozen=True, slots=True)
class LimitKey:
    """`limit.key`: which attribute splits a limit into buckets (policies/limitkeys.py)."""

    attribute: KeyAttribute
    header: str = ""  # the lower-case header name, for `header:<name>`

    @property
    def name(self) -> str:
        """As written in a policy, and as the bucket key's label: `table`, `header:x-tenant`."""
        if self.attribute is KeyAttribute.HEADER:
            return f"header:{self.header}"
        return self.attribute.value


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: `rate` tokens per `per` seconds, holding at most `burst` tokens."""

    rate: float
    per: float
    burst: float
    scope: Scope
    on_exceed: OnExceed
    max_delay: float  # seconds; 0 with on_exceed=reject
    key: LimitKey | None = None  # one bucket per value of this attribute; None: one bucket

    @property
    def tokens_per_second(self) -> float:
        return self.rate / self.per


@dataclass(frozen=True, slots=True)
class SqlMatch:
    verbs: frozenset[str] | None  # None: any verb
    tables: TableSet | None  # None: any table
    where_absent: bool  # only UPDATE/DELETE without WHERE


@dataclass(frozen=True, slots=True)
class HttpMatch:
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None  # the globs as written (compiled by the compiler)
    hosts: NameSet | None
    headers: tuple[tuple[str, NameSet], ...]  # (lower-case name, value globs), all must match


@dataclass(frozen=True, slots=True)
class Rule:
    policy: str
    name: str
    index: int  # position in its policy, for stable ordering and messages
    action: Action
    sources: NameSet
    sql: SqlMatch | None
    http: HttpMatch | None
    window: Window | None
    limit: Limit | None
    message: str | None
    enforce: bool
    file: str
    line: int

    @property
    def id(self) -> str:
        return f"{self.policy}/{self.name}"

    @property
    def reads_headers(self) -> bool:
        """Deciding this rule needs the request's headers: a header condition, or a limit
        keyed by a header (a cache of decisions by method, host and path would be wrong)."""
        if self.http is not None and self.http.headers:
            return True
        key = self.limit.key if self.limit is not None else None
        return key is not None and key.attribute is KeyAttribute.HEADER


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    destination: NameSet
    zone: ZoneInfo
    default: Action  # ALLOW or DENY
    rules: tuple[Rule, ...]
    file: str
    line: int
