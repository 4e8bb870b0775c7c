"""Attribute-keyed limits: which buckets of a `limit` rule one request draws from.

`limit: {rate: 50, per: 1s, scope: source-app, key: table}` splits the rule's bucket of each
scope key (here: each source app) into one bucket per table. The engine turns every value
into a bucket key part, `table=orders`, appended to the scope key:
`orders-db-guard/inserts|app=billing|table=orders`. A request with several values (a
statement writing two tables, a header sent twice) takes one token from each of their
buckets, all or none, like the tickets of several rules.

Which values: for `table` and `verb`, those the rule is about: the statement's tables that
the rule's `sql.tables` condition matches (all of them without one), and its verbs that
`sql.verbs` names (all without). A request without the attribute (no table, an opaque
`CALL`, no such header) draws from the bucket of the empty value (`table=`). Tables are
keyed by the bare relation name, lower-cased: `sales.orders`, `Orders` and `orders` share
one bucket, so another spelling never opens a second budget.

Values are made safe for a key: `%`, `|` and unprintable characters are percent-encoded
(the lease API takes any Unicode text but no lone surrogates, and `|` separates key
parts), and a value longer than `MAX_VALUE` becomes its start plus a digest, so every
key stays far below the lease API's 512 characters. Pure: no I/O, no state.
"""

from __future__ import annotations

import hashlib
import re

from policies.attributes import HttpRequest
from policies.compiler import host_name, table_key
from policies.spec import KeyAttribute, LimitKey, Rule
from policies.sql.model import StatementInfo

# Longer values keep this many characters plus "~" and a 16-digit digest (57 in all):
# tables (PostgreSQL 63, MySQL 64 bytes) stay readable; long paths stay distinct.
MAX_VALUE = 64
_KEEP = 40
# A header name is an HTTP token (RFC 9110 5.6.2); a longer one than this is a typo.
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]{1,64}$")
NAMES = ("table", "verb", "method", "path", "host", "header:<name>")


def parse_key(text: str) -> LimitKey:
    """`limit.key` as written; ValueError with the reason when it names no attribute."""
    value = text.strip()
    if value.lower().startswith("header:"):
        name = value[len("header:") :].strip().lower()
        if not _HEADER.match(name):
            raise ValueError(
                f"{value!r} does not name a header: expected header:<name>, a header name "
                "of letters, digits and - (e.g. header:x-tenant)"
            )
        return LimitKey(KeyAttribute.HEADER, name)
    try:
        return LimitKey(KeyAttribute(value))
    except ValueError:
        raise ValueError(
            f"expected one of table, verb (SQL) or method, path, host, header:<name> (HTTP), "
            f"got {value!r}"
        ) from None


def values(key: LimitKey, rule: Rule, request: StatementInfo | HttpRequest) -> tuple[str, ...]:
    """The distinct values of `key` in `request` that `rule` is about, sorted; ("",) when
    the request has none."""
    found: set[str] = set()
    attribute = key.attribute
    if isinstance(request, StatementInfo):
        sql = rule.sql
        if attribute is KeyAttribute.TABLE:
            tables = sql.tables if sql is not None else None
            found = {table_key(t) for t in request.tables if tables is None or tables.matches(t)}
        elif attribute is KeyAttribute.VERB:
            verbs = sql.verbs if sql is not None else None
            found = set(request.verbs if verbs is None else request.verbs & verbs)
            if not found and request.opaque:
                found = {request.verb}  # it matched as opaque: its own verb (CALL, DO, ...)
    elif attribute is KeyAttribute.METHOD:
        found = {request.method.upper()}
    elif attribute is KeyAttribute.PATH:
        found = {request.path}
    elif attribute is KeyAttribute.HOST:
        found = {host_name(request.host).lower()} if request.host else set()
    elif attribute is KeyAttribute.HEADER:
        found = set(request.header(key.header))
    return tuple(sorted(found)) if found else ("",)


def part(key: LimitKey, value: str) -> str:
    """The bucket key part of one value: `table=orders`."""
    return f"{key.name}={safe(value)}"


def overflow_part(key: LimitKey) -> str:
    """The key part of the bucket that values beyond a sidecar's cap share (sidecar/limits.py).
    Without `=`, so no value's part can equal it."""
    return f"{key.name}~other"


def safe(value: str) -> str:
    """`value` percent-encoded where it could break a key, and bounded to MAX_VALUE."""
    if "%" in value or "|" in value or not value.isprintable():
        value = "".join(_escape(c) for c in value)
    if len(value) <= MAX_VALUE:
        return value
    digest = hashlib.blake2b(value.encode(), digest_size=8).hexdigest()
    return f"{value[:_KEEP]}~{digest}"


def _escape(c: str) -> str:
    if c in "%|" or not c.isprintable():
        return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
    return c
