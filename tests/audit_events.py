"""One builder of the sidecar's AuditEvent for the tests that need one without a sidecar."""

from __future__ import annotations

import dataclasses
from typing import Any

from sidecar.audit import AuditEvent

# An allowed SELECT through a PostgreSQL sidecar of app billing: the fields the tests that
# build events do not care about. Each test states the ones it checks.
_ALLOWED_SELECT = AuditEvent(
    id="",
    time=0.0,
    app="billing",
    instance="billing-1",
    service="orders-db",
    session="s1",
    protocol="postgres",
    decision="allow",
    action="allow",
    enforced=True,
    rules=(),
    rule=None,
    verbs=("SELECT",),
    tables=(),
    statement="SELECT 1",
)


def audit_event(id: str, time: float, **fields: Any) -> AuditEvent:
    """An AuditEvent: an allowed `SELECT 1` by billing-1 on orders-db unless `fields` say
    otherwise (any AuditEvent field, by name)."""
    return dataclasses.replace(_ALLOWED_SELECT, id=id, time=time, **fields)
