"""MySQL/MariaDB client/server protocol: framing, handshake fields and packet builders.

Sans-I/O and stateless: functions take bytes and return values or bytes. The session state
machine (`sidecar/mysql_session.py`) decides what to do with each packet; this module only
knows the wire format (https://dev.mysql.com/doc/dev/mysql-server/latest/PAGE_PROTOCOL.html,
https://mariadb.com/kb/en/clientserver-protocol/).

A packet is a 3-byte little-endian payload length, a 1-byte sequence id and the payload. A
payload of 0xFFFFFF bytes or more is split into packets of exactly 0xFFFFFF bytes followed by
a shorter one (possibly empty); the sequence id goes up by one per packet.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

MAX_PACKET = 0xFFFFFF  # a packet this long is continued by the next one

# Capability flags (the ones the sidecar reads or removes).
CLIENT_LONG_PASSWORD = 1  # MariaDB clears it to say "MariaDB extended capabilities"
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_COMPRESS = 1 << 5
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25  # MySQL 8
CLIENT_ZSTD_COMPRESSION = 1 << 26  # MySQL 8
CLIENT_QUERY_ATTRIBUTES = 1 << 27  # MySQL 8: changes the COM_QUERY layout
# Removed from the server's greeting: TLS (the app talks plaintext to its local sidecar),
# compression (it changes the framing), and MySQL 8 formats the session does not parse.
STRIPPED_CAPABILITIES = (
    CLIENT_SSL
    | CLIENT_COMPRESS
    | CLIENT_ZSTD_COMPRESSION
    | CLIENT_QUERY_ATTRIBUTES
    | CLIENT_OPTIONAL_RESULTSET_METADATA
)

# Server status flags (OK and EOF packets).
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_NO_BACKSLASH_ESCAPES = 0x0200

# Commands.
COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_REFRESH = 0x07
COM_SHUTDOWN = 0x08
COM_STATISTICS = 0x09
COM_PROCESS_INFO = 0x0A
COM_PROCESS_KILL = 0x0C
COM_DEBUG = 0x0D
COM_PING = 0x0E
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_SET_OPTION = 0x1B
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F
# COM_SET_OPTION's options.
MYSQL_OPTION_MULTI_STATEMENTS_ON = 0

# Packet headers.
OK, EOF, ERR, LOCAL_INFILE = 0x00, 0xFE, 0xFF, 0xFB

# Error codes the sidecar sends.
ER_TABLEACCESS_DENIED = 1142  # "command denied to user": what a missing GRANT gives
ER_USER_LIMIT_REACHED = 1226  # "has exceeded the ... resource": MySQL's own resource limits
ER_UNKNOWN_COM = 1047
ER_NET_PACKETS_OUT_OF_ORDER = 1156
ER_NOT_SUPPORTED = 1235
ER_UNKNOWN_STMT_HANDLER = 1243  # an execution of a statement id the server does not know
UNKNOWN_STMT_STATE = "HY000"
# "Bad handshake" (08S01): the TLS errors' code. Not 2026 (CR_SSL_CONNECTION_ERROR):
# libmariadb takes an error code from 2000 to 2999 sent by a server for a malformed packet.
ER_HANDSHAKE_ERROR = 1043
ER_ACCESS_DENIED = 1045

# Authentication packets from the server besides OK and ERR.
AUTH_MORE_DATA = 0x01  # plugin data (caching_sha2's status byte, a public key...)
AUTH_SWITCH = 0xFE  # AuthSwitchRequest: plugin name, NUL, the new scramble
# caching_sha2_password: the client's public-key request and the server's status bytes.
SHA2_REQUEST_PUBLIC_KEY = 0x02
SHA2_FAST_AUTH_SUCCESS = 0x03
SHA2_PERFORM_FULL_AUTH = 0x04
CACHING_SHA2 = "caching_sha2_password"

_VERSION = re.compile(r"^(?:5\.5\.5-)?(\d+)\.(\d+)\.(\d+)")


class ProtocolError(Exception):
    """A packet that violates the protocol; the connection it came from is closed."""


def packet_header(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """(payload length, sequence id) of the packet at `pos` (4 bytes must be there)."""
    return buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16, buf[pos + 3]


def skip_rows(buf: bytes | bytearray, pos: int, size: int) -> tuple[int, int]:
    """Walk the complete row packets of a result set from `pos`: (position after them, how
    many). Stops before a packet that may end the result or needs a closer look: one whose
    first byte is 0xFE or 0xFF (EOF, OK with CLIENT_DEPRECATE_EOF, ERR), an empty one, one of
    0xFFFFFF bytes (continued), or one not complete in `buf[:size]`.

    A row costs a few operations on local variables; where two rows in a row have the same
    length (fixed-width columns: most binary-protocol results), the rows after them are
    checked at that stride in bulk (`_same_length`), without a Python step per row."""
    rows = 0
    last = -1
    while size - pos > 4:
        length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
        end = pos + 4 + length
        if end > size or buf[pos + 4] >= EOF or length == MAX_PACKET or not length:
            break
        rows += 1
        pos = end
        if length == last:
            n = _same_length(buf, pos, size, length)
            pos += n * (length + 4)
            rows += n
            # Mixed lengths: no more bulk tries in this call unless that one paid off.
            last = -1 if n >= 8 else -2
        elif last != -2:
            last = length
    return pos, rows


_BYTES = [bytes((i,)) for i in range(256)]


def _same_length(buf: bytes | bytearray, pos: int, size: int, length: int) -> int:
    """How many complete row packets of payload `length` follow at `pos`, back to back.

    The k packets that would fit are read through strided slices (one byte per packet,
    copied in C): each of the three length bytes must repeat, and no first payload byte may
    be 0xFE or 0xFF. The count is the longest run from `pos` that passes all four checks,
    so every packet counted is one a packet-by-packet walk would have counted too."""
    stride = length + 4
    k = (size - pos) // stride
    if k < 2:
        return 0
    stop = pos + k * stride
    n = k
    for i, value in enumerate((length & 0xFF, length >> 8 & 0xFF, length >> 16)):
        column = buf[pos + i : stop : stride]
        if column.count(value) != k:  # the run ends before the data does: where?
            n = min(n, k - len(column.lstrip(_BYTES[value])))
            if not n:
                return 0
    first = buf[pos + 4 : stop : stride]
    for marker in (b"\xfe", b"\xff"):
        at = first.find(marker, 0, n)
        if at >= 0:
            n = at
    return n


def packets(payload: bytes, seq: int) -> bytes:
    """`payload` framed as packets starting at sequence id `seq`."""
    out = bytearray()
    pos = 0
    while True:
        chunk = payload[pos : pos + MAX_PACKET]
        out += len(chunk).to_bytes(3, "little") + bytes([seq & 0xFF]) + chunk
        seq += 1
        pos += len(chunk)
        if len(chunk) < MAX_PACKET:
            return bytes(out)


def err_packet(seq: int, code: int, sqlstate: str, message: str) -> bytes:
    """An ERR packet (protocol 4.1 form, with the SQLSTATE marker)."""
    return packets(err_payload(code, sqlstate, message), seq)


def err_payload(code: int, sqlstate: str, message: str) -> bytes:
    """The payload of an ERR packet, to be framed later (`packets`)."""
    text = message.encode("utf-8", "replace")[:8000]
    return b"\xff" + struct.pack("<H", code) + b"#" + sqlstate.encode("ascii")[:5] + text


@dataclass(frozen=True, slots=True)
class ErrFields:
    code: int
    sqlstate: str | None
    message: str


def err_fields(payload: bytes | bytearray) -> ErrFields:
    if len(payload) < 3:
        raise ProtocolError("ERR packet too short")
    code = payload[1] | payload[2] << 8
    if len(payload) >= 9 and payload[3] == 0x23:  # '#'
        state = bytes(payload[4:9]).decode("ascii", "replace")
        return ErrFields(code, state, bytes(payload[9:]).decode("utf-8", "replace"))
    return ErrFields(code, None, bytes(payload[3:]).decode("utf-8", "replace"))


def lenenc_int(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """A length-encoded integer at `pos`: (value, position after it)."""
    if pos >= end:
        raise ProtocolError("truncated length-encoded integer")
    first = buf[pos]
    if first < 0xFB:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > end:
        raise ProtocolError(f"invalid length-encoded integer (first byte {first:#x})")
    return int.from_bytes(buf[pos + 1 : pos + 1 + size], "little"), pos + 1 + size


def ok_info(payload: bytes | bytearray) -> tuple[int, int]:
    """(affected rows, status flags) of an OK packet (header 0x00, or 0xFE for the OK that
    ends a result set with CLIENT_DEPRECATE_EOF)."""
    end = len(payload)
    rows, pos = lenenc_int(payload, 1, end)
    _, pos = lenenc_int(payload, pos, end)  # last insert id
    if pos + 2 > end:
        return rows, 0
    return rows, payload[pos] | payload[pos + 1] << 8


def status_offset(buf: bytes | bytearray, start: int, end: int, eof: bool) -> int:
    """Where the status flags of the OK (`eof` False, header 0x00 or 0xFE) or EOF packet
    whose payload is `buf[start:end]` are, or -1 when it has none."""
    if eof:
        at = start + 3  # after the header and the warning count
    else:
        _, pos = lenenc_int(buf, start + 1, end)  # affected rows
        _, at = lenenc_int(buf, pos, end)  # last insert id
    return at if at + 2 <= end else -1


def eof_status(payload: bytes | bytearray) -> int:
    """Status flags of an EOF packet (0xFE, warnings, status)."""
    return payload[3] | payload[4] << 8 if len(payload) >= 5 else 0


@dataclass(frozen=True, slots=True)
class Greeting:
    """What the session needs from the server's Initial Handshake (protocol v10)."""

    server_version: str
    version: int  # M*10000 + m*100 + p, for /*!NNNNN */ comments
    mariadb: bool
    capabilities: int  # both halves, plus MariaDB's extended ones in bits 32-63
    auth_plugin: str
    caps_at: int  # offset of the lower two capability bytes in the payload
    upper_caps_at: int  # offset of the upper two (-1: not sent)
    extended_caps_at: int  # offset of MariaDB's four extended bytes (-1: not MariaDB)
    scramble: bytes = b""  # the nonce the client's auth response answers (20 bytes)


def parse_greeting(payload: bytes | bytearray) -> Greeting:
    end = len(payload)
    if end < 1 or payload[0] != 10:
        raise ProtocolError(f"unsupported handshake protocol {payload[0] if end else None}")
    nul = payload.find(b"\0", 1)
    if nul < 0:
        raise ProtocolError("server version is not NUL-terminated")
    text = bytes(payload[1:nul]).decode("ascii", "replace")
    caps_at = nul + 1 + 4 + 8 + 1  # connection id, scramble part 1, filler
    if caps_at + 2 > end:
        raise ProtocolError("handshake too short")
    caps = payload[caps_at] | payload[caps_at + 1] << 8
    upper_at = extended_at = -1
    plugin = ""
    scramble = bytes(payload[nul + 5 : nul + 13])  # part 1, after the connection id
    if caps_at + 2 + 1 + 2 + 2 <= end:
        upper_at = caps_at + 2 + 1 + 2  # after character set and status flags
        caps |= (payload[upper_at] | payload[upper_at + 1] << 8) << 16
        scramble_len = payload[upper_at + 2] if upper_at + 3 <= end else 0
        reserved = upper_at + 3
        mariadb_caps = not caps & CLIENT_LONG_PASSWORD
        if mariadb_caps and reserved + 10 <= end:
            extended_at = reserved + 6
            caps |= int.from_bytes(payload[extended_at : extended_at + 4], "little") << 32
        scramble += bytes(payload[reserved + 10 : reserved + 10 + max(12, scramble_len - 9)])
        at = reserved + 10 + max(13, scramble_len - 8)
        if caps & CLIENT_PLUGIN_AUTH and at < end:
            stop = payload.find(b"\0", at)
            plugin = bytes(payload[at : stop if stop >= 0 else end]).decode("ascii", "replace")
    m = _VERSION.match(text)
    version = int(m[1]) * 10000 + int(m[2]) * 100 + int(m[3]) if m else 0
    mariadb = "mariadb" in text.lower()
    return Greeting(text, version, mariadb, caps, plugin, caps_at, upper_at, extended_at, scramble)


def strip_greeting(payload: bytes | bytearray, greeting: Greeting) -> bytes:
    """The greeting with TLS, compression and unparsed formats (MariaDB's extended
    capabilities included) removed from the capability flags; same length."""
    out = bytearray(payload)
    low = greeting.capabilities & 0xFFFF & ~STRIPPED_CAPABILITIES
    out[greeting.caps_at : greeting.caps_at + 2] = low.to_bytes(2, "little")
    if greeting.upper_caps_at >= 0:
        high = (greeting.capabilities >> 16) & 0xFFFF & ~(STRIPPED_CAPABILITIES >> 16)
        out[greeting.upper_caps_at : greeting.upper_caps_at + 2] = high.to_bytes(2, "little")
    if greeting.extended_caps_at >= 0:
        out[greeting.extended_caps_at : greeting.extended_caps_at + 4] = bytes(4)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    capabilities: int
    charset: int
    user: str
    database: str | None
    auth_plugin: str | None


def is_ssl_request(payload: bytes | bytearray) -> bool:
    return len(payload) == 32 and bool(int.from_bytes(payload[:4], "little") & CLIENT_SSL)


def with_ssl(hello: bytes | bytearray) -> bytes:
    """A HandshakeResponse41 payload with CLIENT_SSL set in its capability flags."""
    caps = int.from_bytes(hello[:4], "little") | CLIENT_SSL
    return caps.to_bytes(4, "little") + bytes(hello[4:])


def ssl_request(hello: bytes | bytearray) -> bytes:
    """The SSLRequest payload that goes before `hello` (a HandshakeResponse41): its first
    32 bytes (capabilities, max packet size, character set, filler; MariaDB's extended
    capabilities in the last four), with CLIENT_SSL set."""
    return with_ssl(hello[:32])


def auth_switch(payload: bytes | bytearray) -> tuple[str, bytes]:
    """An AuthSwitchRequest's plugin name and scramble (without its trailing NUL). The
    one-byte form (0xFE alone) is the old request for mysql_old_password."""
    if len(payload) == 1:
        return "mysql_old_password", b""
    plugin, pos = _cstring(payload, 1, len(payload))
    data = bytes(payload[pos:])
    return plugin, data[:-1] if data.endswith(b"\0") else data


def change_user_plugin(payload: bytes | bytearray, caps: int) -> str | None:
    """The authentication plugin a COM_CHANGE_USER names (None: not sent)."""
    end = len(payload)
    _, pos = _cstring(payload, 1, end)  # user
    if caps & CLIENT_SECURE_CONNECTION:
        if pos >= end:
            raise ProtocolError("COM_CHANGE_USER truncated")
        pos += 1 + payload[pos]
    else:
        _, pos = _cstring(payload, pos, end)
    if pos >= end:
        return None
    _, pos = _cstring(payload, pos, end)  # database
    pos += 2  # character set
    if not caps & CLIENT_PLUGIN_AUTH or pos >= end:
        return None
    return _cstring(payload, pos, end)[0]


def parse_handshake_response(payload: bytes | bytearray) -> HandshakeResponse:
    """HandshakeResponse41: the client's capabilities, character set, user and database."""
    end = len(payload)
    if end < 32:
        raise ProtocolError("handshake response too short")
    caps = int.from_bytes(payload[:4], "little")
    if not caps & CLIENT_PROTOCOL_41:
        raise ProtocolError("clients older than protocol 4.1 are not supported")
    charset = payload[8]
    user, pos = _cstring(payload, 32, end)
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        n, pos = lenenc_int(payload, pos, end)
    elif caps & CLIENT_SECURE_CONNECTION:
        if pos >= end:
            raise ProtocolError("handshake response truncated")
        n, pos = payload[pos], pos + 1
    else:
        _, pos = _cstring(payload, pos, end)
        n = 0
    pos += n
    if pos > end:
        raise ProtocolError("auth response runs past the packet")
    database = plugin = None
    if caps & CLIENT_CONNECT_WITH_DB and pos < end:
        database, pos = _cstring(payload, pos, end)
    if caps & CLIENT_PLUGIN_AUTH and pos < end:
        plugin, pos = _cstring(payload, pos, end)
    return HandshakeResponse(caps, charset, user, database, plugin)


def _cstring(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    nul = buf.find(b"\0", pos, end)
    if nul < 0:
        raise ProtocolError("string field is not NUL-terminated")
    return bytes(buf[pos:nul]).decode("utf-8", "replace"), nul + 1


# Collation ids -> Python codecs for decoding statements. Only character sets in which a
# byte below 0x80 is always that ASCII character are listed: in GBK, SJIS, Big5 and CP932 a
# backslash byte can be the second byte of a character, so texts in them are not guessed at.
_UTF8_NAMES = ("utf8", "utf8mb3", "utf8mb4")
_LATIN1_COLLATIONS = frozenset({5, 8, 15, 31, 47, 48, 49, 94})
_ASCII_COLLATIONS = frozenset({11, 65})
_BINARY = 63


def collation_codec(collation: int) -> str | None:
    """The codec for a handshake collation id, or None when the sidecar must not guess."""
    if collation in (33, 45, 46, 83) or 192 <= collation <= 215 or 224 <= collation <= 247:
        return "utf-8"  # utf8mb3 and utf8mb4 collations
    if 255 <= collation < 310:  # MySQL 8's utf8mb4_0900 family
        return "utf-8"
    if collation in _LATIN1_COLLATIONS:
        return "cp1252"  # MySQL's latin1 is Windows-1252
    if collation in _ASCII_COLLATIONS or collation == _BINARY:
        return "latin-1"
    return None


def charset_codec(name: str) -> str | None:
    """The codec for a character set name given to SET NAMES, or None."""
    name = name.strip().strip("'\"`").lower()
    if name in _UTF8_NAMES:
        return "utf-8"
    if name == "latin1":
        return "cp1252"
    if name in ("ascii", "binary"):
        return "latin-1"
    return None
