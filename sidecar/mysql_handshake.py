"""The connection phase of a MySQL/MariaDB session: the server's greeting, the app's
HandshakeResponse, TLS to the server, and authentication (sans-I/O). `MySqlSession` mixes it
in, over the response FIFO (`mysql_responses.Responses`), which ends an authentication
exchange at the server's OK or ERR.

- The app talks plaintext to its sidecar: TLS, compression and formats the session does not
  parse leave the greeting it sees (docs/decisions/0006, item 1).
- TLS to the server (a route's `tls.mode`, libpq's names) starts in the middle of MySQL's
  handshake: when the greeting offers CLIENT_SSL and the mode wants TLS, the app's
  HandshakeResponse is held, its first 32 bytes go to the server as the SSLRequest
  (CLIENT_SSL set, sequence id 1), the driver upgrades the connection (`start_tls`, then
  `tls_started` or `tls_failed`), and the HandshakeResponse follows over TLS with CLIENT_SSL
  set and sequence id 2. The app never sent an SSLRequest, so until authentication ends its
  packets are numbered one lower than the server's: each is renumbered on its way, in both
  directions (`_shift`); the command phase restarts at 0 and needs nothing. A server
  without TLS is refused for modes other than prefer: the app's HandshakeResponse is
  answered with ERR 1043 (08S01) and never reaches the server; prefer goes on in plaintext.
- Authentication passes through whatever the plugin (native password, ed25519,
  caching_sha2...). One exchange cannot: caching_sha2_password's full authentication when
  the sidecar holds TLS to the server. The server then expects the password itself (it
  trusts the TLS), while the app, on a plaintext connection, asks for an RSA public key
  (0x02) to encrypt it with. The sidecar answers that request with its own key, decrypts
  the app's answer and sends the password over TLS, as the server expects there. Over a
  plaintext connection to the server the whole exchange passes through, but a password the
  app sends in cleartext (mysql-connector-python does, after "perform full
  authentication") is refused rather than sent unencrypted over the network.
- A packet the app sends with sequence id 0 during authentication is a command sent before
  the exchange ended: it waits for the end and is then decided like any other, never
  forwarded as authentication data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar import mysql_responses as rs
from sidecar.protocols import mysql as my

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

GREETING, HANDSHAKE, AUTH, COMMAND = range(4)
assert rs.COMMAND_PHASE == COMMAND  # the response side's fast path checks it
# Where TLS to the server stands (MISSING: the route requires it, the server has none).
TLS_OFF, TLS_WANTED, TLS_STARTING, TLS_ON, TLS_MISSING = range(5)
# caching_sha2's full authentication: not asked; asked (the app's answer is next); the
# sidecar sent its public key (the app's next packet is the encrypted password).
_FULL_NO, _FULL_ASKED, _FULL_KEY_SENT = range(3)
# The sidecar's RSA key for caching_sha2 over TLS: one per process, made on first use.
RSA_BITS = 2048


class Handshake(rs.Responses):
    """The connection phase of one session; `MySqlSession` supplies `_client_data`,
    `greeted` and the attributes below."""

    to_server: bytearray
    multi_statements: bool
    encoding: str | None
    _cin: bytearray
    _cseq: int

    def __init__(
        self,
        tls_mode: str = "disable",
        upstream: str = "",
        start_tls: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.tls_mode = tls_mode
        self.upstream = upstream  # how errors name the server ("host:port", "NAME.service")
        self._start_tls = start_tls  # the driver's: upgrade once the SSLRequest is written
        self.tls = TLS_OFF
        self.greeting: my.Greeting | None = None
        self.client: my.HandshakeResponse | None = None
        self._phase = GREETING
        self._hello: bytes | None = None  # the HandshakeResponse held while TLS starts
        self._shift = 0  # server's sequence id minus the app's, during authentication
        self._hin = bytearray()  # server bytes not yet renumbered (a cut packet)
        self._plugin = ""  # the authentication plugin of the exchange under way
        self._scramble = b""  # its nonce (the greeting's, or the last AuthSwitchRequest's)
        self._full = _FULL_NO
        self._resume = False  # app packets waited for the end of authentication

    # hooks the session implements
    def greeted(self, greeting: my.Greeting, no_backslash_escapes: bool) -> None: ...

    # -- server -> app ----------------------------------------------------------------------

    def _greeting(self, data: bytes) -> bytes:
        """Read the greeting (once complete), decide on TLS, forward it stripped; returns
        the bytes after it."""
        self._sin += data
        buf = self._sin
        if len(buf) < 4:
            return b""
        length, _ = my.packet_header(buf, 0)
        if len(buf) < 4 + length:
            return b""
        packet = bytes(buf[: 4 + length])
        payload = packet[4:]
        rest = bytes(buf[4 + length :])
        buf.clear()
        if payload[:1] == b"\xff":  # refused before the handshake (too many connections...)
            self.to_client += packet
            self.closing = "the server refused the connection"
            return b""
        try:
            self.greeting = g = my.parse_greeting(payload)
        except my.ProtocolError as exc:
            self._fail(f"invalid greeting from the server: {exc}")
            return b""
        status_at = g.caps_at + 3
        nbe = len(payload) > status_at + 1 and bool(
            (payload[status_at] | payload[status_at + 1] << 8)
            & my.SERVER_STATUS_NO_BACKSLASH_ESCAPES
        )
        self.greeted(g, nbe)
        if self.tls_mode != "disable":
            if g.capabilities & my.CLIENT_SSL:
                self.tls = TLS_WANTED
            elif self.tls_mode != "prefer":
                self.tls = TLS_MISSING  # said in answer to the app's HandshakeResponse
        self._plugin, self._scramble = g.auth_plugin, g.scramble
        self.to_client += my.packets(my.strip_greeting(payload, g), 0)
        self._phase = HANDSHAKE
        if self._cin:
            self.client_data(b"")
        return rest

    def _renumbered(self, data: bytes) -> bytes:
        """Server packets of an authentication exchange whose sequence ids differ from the
        app's (`_shift`): each goes to the response FIFO renumbered; returns the bytes after
        the exchange's end, which need nothing."""
        buf = self._hin
        buf += data
        pos, size = 0, len(buf)
        while self._shift and self.closing is None and size - pos >= 4:
            length, seq = my.packet_header(buf, pos)
            end = pos + 4 + length
            if end > size:
                break
            if length >= my.MAX_PACKET:
                self._fail("invalid packet from the server: authentication packet of 16 MiB")
                break
            head = length.to_bytes(3, "little") + bytes([(seq - self._shift) & 0xFF])
            self.responses(head + bytes(buf[pos + 4 : end]))
            pos = end
        rest = bytes(buf[pos:]) if not self._shift else b""
        del buf[: size if not self._shift else pos]
        return rest

    def auth_more(self, buf: bytes | bytearray, start: int, end: int) -> None:
        """A server packet inside an authentication exchange (not its OK or ERR): follow the
        plugin in use and caching_sha2's request for the password."""
        first = buf[start] if end > start else -1
        if first == my.AUTH_SWITCH:
            self._plugin, self._scramble = my.auth_switch(buf[start:end])
            self._full = _FULL_NO
        elif (
            first == my.AUTH_MORE_DATA
            and end - start == 2
            and buf[start + 1] == my.SHA2_PERFORM_FULL_AUTH
            and self._plugin == my.CACHING_SHA2
        ):
            self._full = _FULL_ASKED

    def auth_done(self, ok: bool) -> None:
        """The server's OK or ERR ended an authentication exchange: commands follow (after a
        failed COM_CHANGE_USER the server keeps the previous user)."""
        self._phase = COMMAND
        self._shift = 0
        self._full = _FULL_NO
        self._resume = bool(self._cin)

    # -- app -> server ----------------------------------------------------------------------

    def _waits(self, seq: int) -> bool:
        """Whether the app's next packet (sequence id `seq`) waits in the input buffer: TLS
        to the server is starting, or it is a command sent before authentication ended."""
        return self._phase == AUTH and (seq == 0 or self.tls == TLS_STARTING)

    def _connection_packet(self, payload: bytes, seq: int, raw: bytes) -> None:
        """One packet from the app before the command phase (`raw`: as it came)."""
        if self._phase == HANDSHAKE:
            self._handshake(payload, seq, raw)
            return
        if self._full != _FULL_NO:
            answer = self._full_auth(payload, seq)
            if answer is None:
                return  # answered here
            payload = answer
        elif not self._shift:
            self.to_server += raw
            return
        self.to_server += my.packets(payload, (seq + self._shift) & 0xFF)

    def _handshake(self, payload: bytes, seq: int, raw: bytes) -> None:
        if my.is_ssl_request(payload):
            raise my.ProtocolError("TLS between the app and its sidecar is not supported")
        self.client = hello = my.parse_handshake_response(payload)
        server_caps = self.greeting.capabilities if self.greeting else 0
        self.deprecate_eof = bool(hello.capabilities & server_caps & my.CLIENT_DEPRECATE_EOF)
        self.multi_statements = bool(hello.capabilities & my.CLIENT_MULTI_STATEMENTS)
        self.encoding = my.collation_codec(hello.charset)
        self._phase = AUTH
        self.expect(rs.AUTH)
        self._plugin = hello.auth_plugin or self._plugin
        if self.tls == TLS_MISSING:  # its credentials stay here
            self.tls_failed(
                f"upstream {self.ctx.service} ({self.upstream}) does not offer TLS, and the "
                f"route's tls mode is {self.tls_mode}"
            )
            return
        if self.tls != TLS_WANTED:
            self.to_server += raw
            return
        self.to_server += my.packets(my.ssl_request(payload), seq)
        self._hello = my.packets(my.with_ssl(payload), seq + 1)
        self._shift = 1
        self.tls = TLS_STARTING
        if self._start_tls is not None:
            self._start_tls()

    def change_user(self, payload: bytes) -> None:
        """COM_CHANGE_USER starts another authentication exchange."""
        self._phase = AUTH
        self.expect(rs.AUTH)
        caps = self.client.capabilities if self.client else 0
        try:
            self._plugin = my.change_user_plugin(payload, caps) or "mysql_native_password"
        except my.ProtocolError:
            self._plugin = ""  # the server will say what it thinks of it

    def tls_started(self) -> None:
        """The driver upgraded the connection to the server: the HandshakeResponse goes."""
        self.tls = TLS_ON
        hello, self._hello = self._hello, None
        if hello is not None:
            self.to_server += hello
        if self._cin:
            self.client_data(b"")

    def tls_failed(self, reason: str) -> None:
        """No TLS with the server (`reason` names the server and why): the app's
        HandshakeResponse gets an ERR, and the connection closes."""
        self._hello = None
        self._close_with(self._cseq, my.ER_HANDSHAKE_ERROR, "08S01", reason)

    def _full_auth(self, payload: bytes, seq: int) -> bytes | None:
        """The app's packet after caching_sha2's "perform full authentication": what goes to
        the server in its place, or None (answered here)."""
        full, self._full = self._full, _FULL_NO
        if self.tls != TLS_ON:  # plaintext to the server: RSA only, never the password
            if payload in (b"", b"\0", b"\x02") or (len(payload) >= 128 and len(payload) % 64 == 0):
                return payload  # no password, the key request, or an RSA-encrypted password
            self._refuse(
                seq,
                "the app sent its password unencrypted (caching_sha2_password), and the "
                f"sidecar's connection to upstream {self.ctx.service} ({self.upstream}) is not "
                "TLS: set the route's tls mode, or have the app encrypt it with the server's "
                "RSA key (--get-server-public-key)",
            )
            return None
        if full == _FULL_ASKED and payload == bytes([my.SHA2_REQUEST_PUBLIC_KEY]):
            # The app asks for a key on its plaintext hop; the server, over TLS, would take
            # the request for the password. Our key has the password encrypted to us instead.
            self.to_client += my.packets(bytes([my.AUTH_MORE_DATA]) + public_pem(), seq + 1)
            self._full = _FULL_KEY_SENT
            self._shift -= 2  # the request and our answer never reach the server
            return None
        if full == _FULL_ASKED:  # the password itself (mysql-connector-python sends it)
            return payload
        password = decrypt_password(payload, self._scramble)
        if password is None:
            self._refuse(
                seq,
                "the app's encrypted password does not decrypt with the key the sidecar sent it",
            )
        return password

    def _refuse(self, seq: int, reason: str) -> None:
        self._close_with(seq, my.ER_ACCESS_DENIED, "28000", reason)

    def _close_with(self, seq: int, code: int, sqlstate: str, reason: str) -> None:
        """Answer the app's packet `seq` with an ERR saying `reason`, then close both sides
        (the session's `_fail` too)."""
        self.to_client += my.err_packet((seq + 1) & 0xFF, code, sqlstate, f"sluice: {reason}")
        self.closing = reason


@functools.cache
def _rsa_key() -> RSAPrivateKey:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


@functools.cache
def public_pem() -> bytes:
    """The sidecar's RSA public key as MySQL servers send theirs (PEM, SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    return (
        _rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def decrypt_password(blob: bytes, scramble: bytes) -> bytes | None:
    """caching_sha2's RSA-encrypted password (OAEP with SHA-1, of the NUL-terminated password
    XORed with the scramble, as MySQL clients make it): the NUL-terminated password, or None."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    scramble = scramble[:20]  # clients XOR with SCRAMBLE_LENGTH bytes
    if not scramble:
        return None
    try:
        xored = _rsa_key().decrypt(
            blob,
            padding.OAEP(
                mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
            ),
        )
    except ValueError:
        return None
    n = len(scramble)
    return bytes(b ^ scramble[i % n] for i, b in enumerate(xored))
