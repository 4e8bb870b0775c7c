"""The MySQL connection phase, byte for byte, where no server here can produce it: MySQL 8's
caching_sha2_password (fast path, full authentication with the public-key request and the
RSA-encrypted password, the password itself), over a plaintext and over a TLS connection to
the server, and the sequence ids around the sidecar's own SSLRequest.

MariaDB 10.11 has no caching_sha2_password server plugin and no MySQL 8 server can be
installed here, so the server's packets are built from the protocol documentation
(https://dev.mysql.com/doc/dev/mysql-server/latest/page_caching_sha2_authentication_exchanges.html)
and the app's with PyMySQL's own functions (its scramble and its RSA encryption). None of
this was run against a real MySQL 8. TLS against a real MariaDB: test_mysql_tls.py.
"""

from __future__ import annotations

import random
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pymysql import _auth

from sidecar import mysql_handshake
from sidecar.mysql_session import MySqlSession
from sidecar.protocols import mysql as my
from tests.sidecar.splits import HOWS, pieces
from tests.sidecar.test_mysql_replay import context

# Every case runs against the pure Python session and the one over the compiled response
# FIFO (conftest.mysql_build).
pytestmark = pytest.mark.usefixtures("mysql_build")

NONCE = bytes(range(0x21, 0x21 + 20))  # the greeting's 20 bytes (never NUL)
OTHER_NONCE = bytes(range(0x41, 0x41 + 20))  # an AuthSwitchRequest's
PASSWORD = b"s3cret-pw"
SERVER_CAPS = (
    my.CLIENT_LONG_PASSWORD
    | my.CLIENT_CONNECT_WITH_DB
    | my.CLIENT_PROTOCOL_41
    | my.CLIENT_SSL
    | 1 << 13  # CLIENT_TRANSACTIONS
    | my.CLIENT_SECURE_CONNECTION
    | my.CLIENT_MULTI_STATEMENTS
    | 1 << 17  # CLIENT_MULTI_RESULTS
    | my.CLIENT_PLUGIN_AUTH
    | my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | my.CLIENT_DEPRECATE_EOF
)
APP_CAPS = (
    my.CLIENT_LONG_PASSWORD
    | my.CLIENT_PROTOCOL_41
    | 1 << 13
    | my.CLIENT_SECURE_CONNECTION
    | 1 << 17
    | my.CLIENT_PLUGIN_AUTH
    | my.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
)
OK = b"\x00\x00\x00\x02\x00\x00\x00"
FULL_AUTH = b"\x01\x04"
FAST_AUTH_OK = b"\x01\x03"


def greeting(caps: int = SERVER_CAPS, plugin: str = "caching_sha2_password") -> bytes:
    """A MySQL 8.0 Initial Handshake (protocol 10)."""
    payload = (
        b"\x0a8.0.36\0"
        + struct.pack("<I", 42)
        + NONCE[:8]
        + b"\0"
        + struct.pack("<HBHH", caps & 0xFFFF, 255, 2, caps >> 16)
        + bytes([21])
        + bytes(10)
        + NONCE[8:]
        + b"\0"
        + plugin.encode()
        + b"\0"
    )
    return my.packets(payload, 0)


def hello(auth: bytes, plugin: str = "caching_sha2_password") -> bytes:
    """A HandshakeResponse41 as PyMySQL builds it (`_request_authentication`)."""
    return (
        struct.pack("<iIB23s", APP_CAPS, 16777216, 45, b"")
        + b"app\0"
        + bytes([len(auth)])
        + auth
        + plugin.encode()
        + b"\0"
    )


def frames(data: bytes | bytearray) -> list[tuple[int, bytes]]:
    """(sequence id, payload) of each packet."""
    out, pos = [], 0
    while pos < len(data):
        length, seq = my.packet_header(data, pos)
        out.append((seq, bytes(data[pos + 4 : pos + 4 + length])))
        pos += 4 + length
    assert pos == len(data)
    return out


class Script:
    """One session fed packet by packet (each whole, one byte at a time, or in random
    pieces) through the driver's entry points (`client_pass`, `server_pass`); `server()`
    and `app()` return what the sidecar sent on, as frames, and `passed` holds the reads
    those entry points returned for the driver to write as they came."""

    def __init__(self, how: str, tls_mode: str = "disable") -> None:
        self.how = how
        self.rng = random.Random(3)
        self.starts = 0
        self.passed: list[tuple[str, bytes]] = []
        self.s = MySqlSession(
            context(), "t-1", tls_mode, "db.internal:3306", start_tls=self._start_tls
        )

    def _start_tls(self) -> None:
        self.starts += 1

    def server(self, data: bytes) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        for piece in pieces(data, self.how, self.rng, 30):
            self._written("s", self.s.server_pass(piece), self.s.to_client)
        return self._taken()

    def app(self, data: bytes) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        for piece in pieces(data, self.how, self.rng, 30):
            self._written("c", self.s.client_pass(piece), self.s.to_server)
        return self._taken()

    def _written(self, side: str, passed: bytes | None, out: bytearray) -> None:
        """A read the entry point returned goes on as the driver writes it: after nothing."""
        if passed is not None:
            assert not out, "passed with output waiting before it"
            assert side == "s" or not self.s.to_client, "passed with an answer waiting"
            self.passed.append((side, passed))
            out += passed

    def _taken(self) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
        """(to the server, to the app) since the last call."""
        up, down = frames(self.s.to_server), frames(self.s.to_client)
        self.s.to_server.clear()
        self.s.to_client.clear()
        return up, down


def server_key() -> bytes:
    """A public key of the server's own (PEM), as a MySQL 8 server sends it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def query(sql: str) -> bytes:
    return my.packets(b"\x03" + sql.encode(), 0)


def assert_commands_work(sc: Script) -> None:
    """After authentication: commands start at sequence id 0 and are decided."""
    up, down = sc.app(query("SELECT 1"))
    assert up == [(0, b"\x03SELECT 1")] and down == []
    assert sc.server(my.packets(OK, 1)) == ([], [(1, OK)])
    up, down = sc.app(query("DROP TABLE t"))
    assert up == []
    assert down[0][0] == 1 and my.err_fields(down[0][1]).code == my.ER_TABLEACCESS_DENIED


# -- plaintext to the server: everything passes through -----------------------------------


@pytest.mark.parametrize("how", HOWS)
def test_plaintext_full_authentication_with_the_servers_key_passes_through(how: str) -> None:
    pem = server_key()
    sc = Script(how)
    _, down = sc.server(greeting())
    assert not my.parse_greeting(down[0][1]).capabilities & my.CLIENT_SSL  # stripped
    first = hello(_auth.scramble_caching_sha2(PASSWORD, NONCE))
    assert sc.app(my.packets(first, 1)) == ([(1, first)], [])
    assert sc.server(my.packets(FULL_AUTH, 2)) == ([], [(2, FULL_AUTH)])
    assert sc.app(my.packets(b"\x02", 3)) == ([(3, b"\x02")], [])  # the key request
    assert sc.server(my.packets(b"\x01" + pem, 4)) == ([], [(4, b"\x01" + pem)])
    blob = _auth.sha2_rsa_encrypt(PASSWORD, NONCE, pem)  # PyMySQL encrypts to the server
    assert sc.app(my.packets(blob, 5)) == ([(5, blob)], [])
    assert sc.server(my.packets(OK, 6)) == ([], [(6, OK)])
    assert sc.starts == 0
    assert_commands_work(sc)


@pytest.mark.parametrize("how", HOWS)
def test_plaintext_fast_path_passes_through(how: str) -> None:
    sc = Script(how)
    sc.server(greeting())
    first = hello(_auth.scramble_caching_sha2(PASSWORD, NONCE))
    sc.app(my.packets(first, 1))
    both = my.packets(FAST_AUTH_OK, 2) + my.packets(OK, 3)
    assert sc.server(both) == ([], [(2, FAST_AUTH_OK), (3, OK)])
    assert_commands_work(sc)


def test_plaintext_never_carries_the_password_itself() -> None:
    """mysql-connector-python answers "perform full authentication" with the password
    itself, TLS or not. Direct, it would have had TLS; through a sidecar without TLS to the
    server, the password would cross the network in the clear: refused."""
    sc = Script("whole", "prefer")
    sc.server(greeting(SERVER_CAPS & ~my.CLIENT_SSL))  # prefer: no TLS offered, plaintext
    sc.app(my.packets(hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)), 1))
    sc.server(my.packets(FULL_AUTH, 2))
    up, down = sc.app(my.packets(PASSWORD + b"\0", 3))
    assert up == []
    assert down[0][0] == 4
    err = my.err_fields(down[0][1])
    assert (err.code, err.sqlstate) == (1045, "28000")
    assert "sent its password unencrypted" in err.message
    assert "upstream orders-db (db.internal:3306) is not TLS" in err.message
    assert sc.s.closing is not None


# -- TLS to the server: the sidecar's SSLRequest, renumbering, and caching_sha2 ---------------


def tls_handshake(sc: Script, first: bytes) -> None:
    """Greeting, the app's HandshakeResponse, the SSLRequest, TLS up, the response over it."""
    _, down = sc.server(greeting())
    assert not my.parse_greeting(down[0][1]).capabilities & my.CLIENT_SSL  # app: plaintext
    up, down = sc.app(my.packets(first, 1))
    assert down == [] and sc.starts == 1
    assert up == [(1, my.with_ssl(first)[:32])]  # the SSLRequest, sequence id 1
    assert my.is_ssl_request(up[0][1])
    assert up[0][1][4:9] == first[4:9]  # the app's max packet size and character set
    assert sc.app(b"") == ([], [])  # nothing more before TLS is up
    sc.s.tls_started()
    up, down = sc._taken()
    assert up == [(2, my.with_ssl(first))] and down == []


@pytest.mark.parametrize("how", HOWS)
def test_tls_full_authentication_the_sidecar_answers_the_key_request(how: str) -> None:
    sc = Script(how, "verify-full")
    tls_handshake(sc, hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)))
    # The server (seq 3) asks for the password; the app sees it one lower.
    assert sc.server(my.packets(FULL_AUTH, 3)) == ([], [(2, FULL_AUTH)])
    # The app, on plaintext, asks for a key: the sidecar answers with its own.
    up, down = sc.app(my.packets(b"\x02", 3))
    assert up == [] and down == [(4, b"\x01" + mysql_handshake.public_pem())]
    assert down[0][1][1:].startswith(b"-----BEGIN PUBLIC KEY-----")
    blob = _auth.sha2_rsa_encrypt(PASSWORD, NONCE, down[0][1][1:])  # real PyMySQL code
    # The password goes to the server over TLS, as it expects there, with its next id.
    assert sc.app(my.packets(blob, 5)) == ([(4, PASSWORD + b"\0")], [])
    assert sc.server(my.packets(OK, 5)) == ([], [(6, OK)])
    assert sc.s.closing is None
    assert_commands_work(sc)


@pytest.mark.parametrize("how", HOWS)
def test_tls_fast_path_and_errors_are_renumbered(how: str) -> None:
    sc = Script(how, "require")
    tls_handshake(sc, hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)))
    both = my.packets(FAST_AUTH_OK, 3) + my.packets(OK, 4)
    assert sc.server(both) == ([], [(2, FAST_AUTH_OK), (3, OK)])
    assert_commands_work(sc)
    # A wrong password: the server's ERR, renumbered too.
    sc = Script(how, "require")
    tls_handshake(sc, hello(b"\x00" * 32))
    err = my.err_payload(1045, "28000", "Access denied for user 'app'")
    assert sc.server(my.packets(err, 3)) == ([], [(2, err)])


@pytest.mark.parametrize("how", HOWS)
def test_tls_auth_switch_to_caching_sha2_uses_the_new_nonce(how: str) -> None:
    sc = Script(how, "require")
    native = hello(_auth.scramble_native_password(PASSWORD, NONCE), "mysql_native_password")
    tls_handshake(sc, native)
    switch = b"\xfecaching_sha2_password\0" + OTHER_NONCE + b"\0"
    assert sc.server(my.packets(switch, 3)) == ([], [(2, switch)])
    answer = _auth.scramble_caching_sha2(PASSWORD, OTHER_NONCE)
    assert sc.app(my.packets(answer, 3)) == ([(4, answer)], [])
    assert sc.server(my.packets(FULL_AUTH, 5)) == ([], [(4, FULL_AUTH)])
    up, down = sc.app(my.packets(b"\x02", 5))
    assert up == [] and down[0][0] == 6
    blob = _auth.sha2_rsa_encrypt(PASSWORD, OTHER_NONCE, down[0][1][1:])
    assert sc.app(my.packets(blob, 7)) == ([(6, PASSWORD + b"\0")], [])
    assert sc.server(my.packets(OK, 7)) == ([], [(8, OK)])
    assert_commands_work(sc)


def test_tls_password_itself_goes_over_tls() -> None:
    """mysql-connector-python's answer to "perform full authentication" is the password:
    over the sidecar's TLS it reaches the server as the server expects, renumbered."""
    sc = Script("whole", "require")
    tls_handshake(sc, hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)))
    sc.server(my.packets(FULL_AUTH, 3))
    assert sc.app(my.packets(PASSWORD + b"\0", 3)) == ([(4, PASSWORD + b"\0")], [])
    assert sc.server(my.packets(OK, 5)) == ([], [(4, OK)])
    assert_commands_work(sc)


def test_tls_password_encrypted_with_another_key_is_refused() -> None:
    pem = server_key()  # a key the app holds, not the sidecar's
    sc = Script("whole", "require")
    tls_handshake(sc, hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)))
    sc.server(my.packets(FULL_AUTH, 3))
    sc.app(my.packets(b"\x02", 3))
    up, down = sc.app(my.packets(_auth.sha2_rsa_encrypt(PASSWORD, NONCE, pem), 5))
    assert up == [] and down[0][0] == 6
    assert "does not decrypt" in my.err_fields(down[0][1]).message
    assert sc.s.closing is not None


def test_tls_change_user_full_authentication() -> None:
    """COM_CHANGE_USER restarts at sequence id 0: no SSLRequest offset, but the key request
    is still answered here, which shifts the rest of that exchange by two."""
    sc = Script("whole", "require")
    tls_handshake(sc, hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)))
    sc.server(my.packets(OK, 3))
    scramble = _auth.scramble_caching_sha2(PASSWORD, NONCE)
    change = (
        b"\x11other\0"
        + bytes([len(scramble)])
        + scramble
        + b"db\0"
        + struct.pack("<H", 45)
        + b"caching_sha2_password\0"
    )
    assert sc.app(my.packets(change, 0)) == ([(0, change)], [])
    assert sc.server(my.packets(FULL_AUTH, 1)) == ([], [(1, FULL_AUTH)])
    up, down = sc.app(my.packets(b"\x02", 2))
    assert up == [] and down[0][0] == 3
    blob = _auth.sha2_rsa_encrypt(PASSWORD, NONCE, down[0][1][1:])
    assert sc.app(my.packets(blob, 4)) == ([(2, PASSWORD + b"\0")], [])
    assert sc.server(my.packets(OK, 3)) == ([], [(5, OK)])
    assert_commands_work(sc)


# -- TLS refused or failed ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_tls_required_from_a_server_without_it_keeps_the_credentials(mode: str) -> None:
    """The app's HandshakeResponse (its credentials) never reaches the plaintext server: it
    is answered with ERR 1043, which every client shows as a connection error."""
    sc = Script("whole", mode)
    sc.server(greeting(SERVER_CAPS & ~my.CLIENT_SSL))
    up, down = sc.app(my.packets(hello(_auth.scramble_caching_sha2(PASSWORD, NONCE)), 1))
    assert up == [] and down[0][0] == 2
    err = my.err_fields(down[0][1])
    assert (err.code, err.sqlstate) == (my.ER_HANDSHAKE_ERROR, "08S01")
    assert err.message == (
        "sluice: upstream orders-db (db.internal:3306) does not offer TLS, and the route's "
        f"tls mode is {mode}"
    )
    assert sc.s.closing is not None and sc.starts == 0


def test_prefer_without_tls_goes_on_in_plaintext() -> None:
    sc = Script("whole", "prefer")
    sc.server(greeting(SERVER_CAPS & ~my.CLIENT_SSL))
    first = hello(_auth.scramble_caching_sha2(PASSWORD, NONCE))
    assert sc.app(my.packets(first, 1)) == ([(1, first)], [])
    assert sc.server(my.packets(OK, 2)) == ([], [(2, OK)])
    assert sc.starts == 0
    assert_commands_work(sc)


def test_disable_ignores_the_servers_tls() -> None:
    sc = Script("whole", "disable")
    sc.server(greeting())
    first = hello(_auth.scramble_caching_sha2(PASSWORD, NONCE))
    assert sc.app(my.packets(first, 1)) == ([(1, first)], [])
    assert sc.starts == 0


def test_tls_handshake_failure_answers_the_handshake_response() -> None:
    sc = Script("whole", "verify-full")
    sc.server(greeting())
    sc.app(my.packets(hello(b""), 1))
    sc._taken()
    sc.s.tls_failed("TLS to upstream orders-db at 10.0.0.1:3306 failed: certificate verify failed")
    up, down = sc._taken()
    assert up == [] and down[0][0] == 2
    err = my.err_fields(down[0][1])
    assert (err.code, err.sqlstate) == (my.ER_HANDSHAKE_ERROR, "08S01")
    assert err.message.startswith("sluice: TLS to upstream orders-db at 10.0.0.1:3306 failed")
    assert sc.s.closing is not None


# -- commands sent before authentication ended -------------------------------------------------


@pytest.mark.parametrize("tls_mode", ["disable", "require"])
@pytest.mark.parametrize("how", HOWS)
def test_the_opening_of_a_session_is_never_passed(tls_mode: str, how: str) -> None:
    """Until authentication ends the driver has more to do than write a read as it came:
    the greeting is rewritten, TLS starts after the sidecar's SSLRequest (the driver's
    `_upgrade_mysql`), sequence ids are renumbered, a command sent with the handshake waits
    for its end. Every read of the connection phase goes through the buffers and the
    driver's pump; once authenticated, commands and their answers are passed."""
    sc = Script(how, tls_mode)
    _, down = sc.server(greeting())
    assert down[0][1] != greeting()[4:]  # rewritten: TLS and more stripped
    first = hello(_auth.scramble_caching_sha2(PASSWORD, NONCE))
    up, _ = sc.app(my.packets(first, 1) + query("SELECT 2"))
    if tls_mode == "require":
        assert up == [(1, my.with_ssl(first)[:32])] and sc.starts == 1
        sc.s.tls_started()
        up = sc._taken()[0]
    assert up[-1] in ((1, first), (2, my.with_ssl(first)))
    seq = 2 if tls_mode == "disable" else 3  # after the sidecar's SSLRequest: one more
    up, down = sc.server(my.packets(FAST_AUTH_OK, seq) + my.packets(OK, seq + 1))
    assert down == [(2, FAST_AUTH_OK), (3, OK)]
    assert up == [(0, b"\x03SELECT 2")]  # waited for the end, then decided
    assert sc.passed == []
    assert sc.server(my.packets(OK, 1)) == ([], [(1, OK)])  # SELECT 2's answer
    assert_commands_work(sc)
    if how == "whole":
        assert sc.passed == [
            ("s", my.packets(OK, 1)),
            ("c", query("SELECT 1")),
            ("s", my.packets(OK, 1)),
        ]  # not the denied DROP, answered here
    else:
        assert sc.passed and all(data[4:] != b"\x03DROP TABLE t" for _, data in sc.passed)


@pytest.mark.parametrize("tls_mode", ["disable", "require"])
def test_a_command_sent_with_the_handshake_waits_and_is_decided(tls_mode: str) -> None:
    """A pipelined command after the HandshakeResponse is not authentication data: it waits
    for the server's OK and is then decided (here: denied, never forwarded)."""
    sc = Script("whole", tls_mode)
    sc.server(greeting())
    first = hello(b"")
    up, _ = sc.app(my.packets(first, 1) + query("DROP TABLE t") + query("SELECT 2"))
    if tls_mode == "require":
        sc.s.tls_started()
        up = sc._taken()[0]
    assert up[-1] in ((1, first), (2, my.with_ssl(first)))  # nothing after it
    ok_seq = 2 if tls_mode == "disable" else 3
    up, down = sc.server(my.packets(OK, ok_seq))
    assert down[0] == (2, OK)
    assert my.err_fields(down[1][1]).code == my.ER_TABLEACCESS_DENIED  # the DROP, after OK
    assert up == [(0, b"\x03SELECT 2")]
