"""Authentication and TLS through the PostgreSQL sidecar, against a private PostgreSQL
cluster (tests/sidecar/pgcluster.py) that has what the shared server lacks: SCRAM, md5 and
cleartext password logins, TLS with our own CA, and a role allowed on `hostssl` only.

(a) The sidecar relays every authentication exchange untouched: right passwords log in,
    wrong ones get the server's own 28P01.
(b) Upstream TLS with libpq's sslmode names: require, verify-ca, verify-full (and their
    failures: a FATAL 08006 naming the upstream, at once), prefer falling back to plaintext.
(c) The app's side is plaintext: the sidecar declines SSLRequest and GSSENCRequest.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from sidecar.config import UpstreamTls
from tests.sidecar.conftest import PG_HOST, PG_PORT, pg_available
from tests.sidecar.pgcluster import PASSWORDS, ClusterUnavailable, PgCluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: orders-db
      rules:
        - name: no-drop
          sql: {verbs: [DROP]}
          action: deny
    """
)
TIMEOUT = 10.0  # bound on every connection attempt and socket read
AUTH_METHODS = {"u_scram": 10, "u_md5": 5, "u_pw": 3}  # role -> AuthenticationRequest code
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    try:
        c = PgCluster()
    except ClusterUnavailable as exc:
        pytest.skip(f"no private PostgreSQL cluster: {exc}")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def main_server() -> None:
    problem = pg_available()
    if problem:
        pytest.skip(problem)


# -- a few bytes of the protocol, for what clients hide ------------------------------------


def startup(user: str, dbname: str = "postgres") -> bytes:
    body = f"user\0{user}\0database\0{dbname}\0\0".encode()
    return struct.pack("!ii", 8 + len(body), 196608) + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = struct.unpack("!ci", recv_exactly(sock, 5))
    return kind, recv_exactly(sock, length - 4)


def error_fields(body: bytes) -> dict[str, str]:
    return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}


def first_reply(port: int, user: str) -> tuple[bytes, bytes]:
    """Open a raw connection to a sidecar, send StartupMessage, return the first message."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(startup(user))
        return read_message(sock)


def server_says(dsn: dict[str, Any], sql: str) -> Any:
    with psycopg.connect(**dsn, connect_timeout=int(TIMEOUT)) as c:
        row = c.execute(sql).fetchone()
        assert row is not None
        return row[0]


def asyncpg_connect(port: int, user: str, password: str) -> str:
    async def go() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=user,
            password=password,
            database="postgres",
            timeout=TIMEOUT,
        )
        try:
            return str(await conn.fetchval("SELECT current_user"))
        finally:
            await conn.close(timeout=TIMEOUT)

    return asyncio.run(go())


SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


# -- (a) authentication is the server's ------------------------------------------------------


@pytest.mark.parametrize("role", sorted(AUTH_METHODS))
def test_password_methods_through_the_sidecar(start_sidecar, cluster: PgCluster, role: str) -> None:
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", cluster.port))
    # The server asks the app for exactly the method its pg_hba.conf line names.
    kind, body = first_reply(sc.port, role)
    assert kind == b"R" and struct.unpack_from("!i", body)[0] == AUTH_METHODS[role]
    dsn = sc.dsn("postgres", user=role, password=PASSWORDS[role])
    assert server_says(dsn, "SELECT current_user") == role
    assert asyncpg_connect(sc.port, role, PASSWORDS[role]) == role


@pytest.mark.parametrize("role", sorted(AUTH_METHODS))
def test_wrong_password_gets_the_servers_28P01(
    start_sidecar, cluster: PgCluster, role: str
) -> None:
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", cluster.port))
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(**sc.dsn("postgres", user=role, password="wrong"), connect_timeout=10)
    assert f'password authentication failed for user "{role}"' in str(info.value)
    with pytest.raises(asyncpg.InvalidPasswordError) as apg:
        asyncpg_connect(sc.port, role, "wrong")
    assert apg.value.sqlstate == "28P01"
    assert f'password authentication failed for user "{role}"' in str(apg.value)
    # The sidecar stays usable for the next app connection.
    dsn = sc.dsn("postgres", user=role, password=PASSWORDS[role])
    assert server_says(dsn, "SELECT 1") == 1


# -- (b) TLS to the upstream ------------------------------------------------------------------


def test_hostssl_role_is_refused_without_tls(start_sidecar, cluster: PgCluster) -> None:
    """The control for the TLS tests: this role really needs an encrypted connection."""
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", cluster.port))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as info:
        asyncpg_connect(sc.port, "u_tls_only", PASSWORDS["u_tls_only"])
    assert info.value.sqlstate == "28000" and "no encryption" in str(info.value)


@pytest.mark.parametrize(
    ("mode", "server_name"),
    [("require", None), ("prefer", None), ("verify-ca", None), ("verify-full", "localhost")],
)
def test_upstream_tls_modes_reach_a_hostssl_role(
    start_sidecar, cluster: PgCluster, mode: str, server_name: str | None
) -> None:
    ca = str(cluster.certs.ca) if mode.startswith("verify") else None
    tls = UpstreamTls(mode=mode, ca_file=ca, server_name=server_name)
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", cluster.port), tls=tls)
    dsn = sc.dsn("postgres", user="u_tls_only", password=PASSWORDS["u_tls_only"])
    assert server_says(dsn, SSL_IN_USE) is True
    assert asyncpg_connect(sc.port, "u_tls_only", PASSWORDS["u_tls_only"]) == "u_tls_only"


def test_verify_full_checks_the_name_against_the_upstream_address(
    start_sidecar, cluster: PgCluster
) -> None:
    # Without server_name the upstream's address is checked: the certificate names 127.0.0.1.
    tls = UpstreamTls(mode="verify-full", ca_file=str(cluster.certs.ca))
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", cluster.port), tls=tls)
    dsn = sc.dsn("postgres", user="u_scram", password=PASSWORDS["u_scram"])
    assert server_says(dsn, SSL_IN_USE) is True


def assert_upstream_failure(port: int, upstream_port: int, reason: str) -> None:
    """A FATAL 08006 naming the upstream, sent promptly, then the sidecar hangs up."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(startup("u_scram"))
        kind, body = read_message(sock)
        assert sock.recv(1) == b""  # closed after the error
    assert time.monotonic() - start < 3
    assert kind == b"E"
    fields = error_fields(body)
    assert fields["S"] == "FATAL" and fields["C"] == "08006"
    assert fields["M"].startswith(
        f"sluice: cannot connect to upstream orders-db at 127.0.0.1:{upstream_port}: "
    )
    assert reason in fields["M"]


@pytest.mark.parametrize(
    ("which_ca", "server_name", "reason"),
    [
        ("other_ca", "localhost", "certificate verify failed"),
        ("ca", "db.invalid", "certificate verify failed"),  # right CA, wrong name
    ],
)
def test_verify_full_failures_are_08006_naming_the_upstream(
    start_sidecar, cluster: PgCluster, which_ca: str, server_name: str, reason: str
) -> None:
    ca = getattr(cluster.certs, which_ca)
    tls = UpstreamTls(mode="verify-full", ca_file=str(ca), server_name=server_name)
    sc = start_sidecar(POLICY, upstream=("127.0.0.1", cluster.port), tls=tls)
    assert_upstream_failure(sc.port, cluster.port, reason)
    # What a real client shows its user.
    with pytest.raises(asyncpg.ConnectionFailureError) as info:
        asyncpg_connect(sc.port, "u_scram", PASSWORDS["u_scram"])
    assert info.value.sqlstate == "08006" and "upstream orders-db" in str(info.value)
    with pytest.raises(psycopg.OperationalError, match="cannot connect to upstream orders-db"):
        psycopg.connect(**sc.dsn("postgres", user="u_scram"), connect_timeout=10)


def test_require_against_a_plaintext_server_fails_with_08006(start_sidecar, main_server) -> None:
    sc = start_sidecar(POLICY, upstream=(PG_HOST, PG_PORT), tls=UpstreamTls(mode="require"))
    assert_upstream_failure(sc.port, PG_PORT, "the server does not accept TLS")


def test_prefer_against_a_plaintext_server_falls_back(start_sidecar, main_server) -> None:
    sc = start_sidecar(POLICY, upstream=(PG_HOST, PG_PORT), tls=UpstreamTls(mode="prefer"))
    assert server_says(sc.dsn("postgres"), SSL_IN_USE) is False


# -- (c) the app's side is plaintext -------------------------------------------------------


def test_app_sslmode_prefer_connects_in_plaintext(start_sidecar, main_server) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn("postgres", sslmode="prefer"), connect_timeout=10) as c:
        assert c.pgconn.ssl_in_use is False
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_app_sslmode_require_fails_clearly(start_sidecar, main_server) -> None:
    sc = start_sidecar(POLICY)
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(**sc.dsn("postgres", sslmode="require"), connect_timeout=10)


def test_app_gssencmode_prefer_connects(start_sidecar, main_server) -> None:
    sc = start_sidecar(POLICY)
    with psycopg.connect(**sc.dsn("postgres", gssencmode="prefer"), connect_timeout=10) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_gssenc_and_ssl_requests_are_declined_then_startup_proceeds(
    start_sidecar, main_server
) -> None:
    # libpq sends GSSENCRequest only with Kerberos credentials at hand, so send it ourselves,
    # in libpq's order: GSSENCRequest, then SSLRequest, then the StartupMessage.
    sc = start_sidecar(POLICY)
    with socket.create_connection(("127.0.0.1", sc.port), timeout=TIMEOUT) as sock:
        sock.sendall(GSSENC_REQUEST)
        assert recv_exactly(sock, 1) == b"N"
        sock.sendall(SSL_REQUEST)
        assert recv_exactly(sock, 1) == b"N"
        sock.sendall(startup("postgres"))
        kind, body = read_message(sock)
        assert (kind, body) == (b"R", b"\0\0\0\0")  # AuthenticationOk (trust)
        while kind != b"Z":
            kind, body = read_message(sock)
        sock.sendall(b"X\0\0\0\4")
