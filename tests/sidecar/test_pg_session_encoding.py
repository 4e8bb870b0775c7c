"""Client encodings: statements are decoded as the server will read them, or not at all."""

from __future__ import annotations

import struct
import textwrap

import pytest

from policies.attributes import Peer
from policies.decider import SqlDecider
from policies.engine import Engine
from policies.loader import load_texts
from policies.sql.inspect import POSTGRES
from sidecar.audit import MemorySink
from sidecar.limits import Limiter
from sidecar.pg_session import PgSession, RouteContext
from sidecar.protocols import postgres as pg

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: db
      rules: [{name: no-drop, sql: {verbs: [DROP]}, action: deny}]
    """
)

# Every case runs against the pure Python session and its Cython build (conftest.pg_build).
pytestmark = pytest.mark.usefixtures("pg_build")


def ready_session(encoding: str) -> PgSession:
    decider = SqlDecider(Engine(load_texts([("p.yaml", POLICY)])), Peer("app", "db"), POSTGRES)
    session = PgSession(RouteContext("app", "app-1", "db", decider, Limiter(), MemorySink()), "s1")
    params = b"user\0u\0database\0d\0\0"
    session.client_data(struct.pack("!ii", 8 + len(params), 196608) + params)
    status = pg.message(b"S", b"client_encoding\0" + encoding.encode() + b"\0")
    session.server_data(pg.message(b"R", struct.pack("!i", 0)) + status + pg.ready_for_query())
    session.to_server.clear()
    session.to_client.clear()
    return session


@pytest.mark.parametrize(
    ("encoding", "text", "denied"),
    [
        ("UTF8", "SELECT 'é'", False),
        ("LATIN1", "SELECT 'é'", False),
        ("SJIS", "SELECT 'ソ'", False),  # ソ is 0x83 0x5C in Shift-JIS: the 0x5C is no backslash
        ("SJIS", "DROP TABLE t", True),
        ("WIN1251", "SELECT 'ж'", False),
        ("MULE_INTERNAL", "SELECT 1", True),  # no codec: never guess, deny on a guarded route
    ],
)
def test_statements_are_decoded_with_the_client_encoding(
    encoding: str, text: str, denied: bool
) -> None:
    session = ready_session(encoding)
    codec = {"UTF8": "utf-8", "LATIN1": "latin-1", "SJIS": "shift_jis", "WIN1251": "cp1251"}.get(
        encoding, "ascii"
    )
    session.client_data(pg.query(text.encode(codec)))
    sent = bytes(session.to_server)
    assert (b"RAISE EXCEPTION" in sent) is denied, sent
    if not denied:
        assert sent == pg.query(text.encode(codec))
