"""PostgreSQL frontend/backend protocol v3: framing, field decoding and message builders.

Sans-I/O and stateless: functions take bytes and return values or bytes. The session state
machine (`sidecar/pg_session.py`) decides what to do with each message; this module only
knows the wire format (https://www.postgresql.org/docs/current/protocol-message-formats.html).
"""

from __future__ import annotations

import struct

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
# Protocol 3.x: major 3 in the high 16 bits; PostgreSQL 18's libpq may ask for 3.2.
PROTOCOL_MAJOR_3 = 3

# Authentication request code of AuthenticationSASL (the mechanisms follow).
AUTH_SASL = 10

# PostgreSQL's own bound on a startup packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_LENGTH = 10_000
# Bound on any other message. The server accepts up to 1 GB for some; a sidecar holding a
# whole message in memory needs a lower, configurable bound.
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")
_UINT16 = struct.Struct("!H")


class ProtocolError(Exception):
    """A message that violates the protocol; the connection it came from is closed."""


def startup_length(buf: bytes | bytearray) -> int | None:
    """Length of the startup-phase packet at the start of `buf` (None: need more bytes)."""
    if len(buf) < 8:
        return None
    length: int = _INT32.unpack_from(buf, 0)[0]
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolError(f"invalid startup packet length {length}")
    return length


def startup_code(packet: bytes | bytearray) -> int:
    """The request code of a startup-phase packet (protocol version or a special request)."""
    return int(_INT32.unpack_from(packet, 4)[0])


def startup_params(packet: bytes | bytearray) -> dict[str, str]:
    """The name/value pairs of a StartupMessage."""
    parts = bytes(packet[8:]).split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolError("startup message parameters are not NUL-terminated")
    fields = [p.decode("utf-8", "replace") for p in parts[:-2]]
    if len(fields) % 2:
        raise ProtocolError("startup message has a parameter without a value")
    return dict(zip(fields[0::2], fields[1::2], strict=True))


# (type byte, length) of the typed message at an offset: one call per message in the
# framing loops, which run for every message of every transaction.
unpack_header = struct.Struct("!Bi").unpack_from


def joined(kept: bytearray, data: bytes | bytearray, limit: int) -> bytes | None:
    """A message a previous read cut (`kept`, which starts at a message boundary) joined
    with this read, as `bytes`, once a framing loop has work in it (a whole message, or a
    length field it will refuse); None: `kept` took the read and waits for more."""
    kept += data
    if len(kept) < 5:
        return None
    length: int = unpack_header(kept, 0)[1]
    if 4 <= length <= limit and len(kept) <= length:
        return None
    buf = bytes(kept)
    kept.clear()
    return buf


def bad_length(kind: int, length: int) -> ProtocolError:
    """The error for a typed message whose length field is out of bounds."""
    return ProtocolError(f"invalid length {length} for message {chr(kind)!r}")


UNTERMINATED = "string field is not NUL-terminated"


def cstring(buf: bytes | bytearray, pos: int, end: int) -> tuple[bytes, int]:
    """The NUL-terminated string at `pos` and the position after its NUL."""
    nul = buf.find(b"\0", pos, end)
    if nul < 0:
        raise ProtocolError(UNTERMINATED)
    return bytes(buf[pos:nul]), nul + 1


def parse_fields(buf: bytes | bytearray, start: int, end: int) -> tuple[bytes, bytes]:
    """Parse message body: (statement name, query text)."""
    name, pos = cstring(buf, start, end)
    query, _ = cstring(buf, pos, end)
    return name, query


def bind_fields(buf: bytes | bytearray, start: int, end: int) -> tuple[bytes, bytes]:
    """Bind message body: (portal name, statement name)."""
    portal, pos = cstring(buf, start, end)
    statement, _ = cstring(buf, pos, end)
    return portal, statement


def error_fields(buf: bytes | bytearray, start: int, end: int) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body: field code -> value."""
    out: dict[str, str] = {}
    pos = start
    while pos < end and buf[pos] != 0:
        code = chr(buf[pos])
        value, pos = cstring(buf, pos + 1, end)
        out[code] = value.decode("utf-8", "replace")
    return out


def auth_code(buf: bytes | bytearray, start: int, end: int) -> int | None:
    """The request code of an Authentication message body (None: too short)."""
    if end - start < 4:
        return None
    return int(_INT32.unpack_from(buf, start)[0])


def sasl_mechanisms(buf: bytes | bytearray, start: int, end: int) -> list[bytes]:
    """The mechanism names of an AuthenticationSASL body, after its code."""
    out = []
    pos = start
    while pos < end and buf[pos] != 0:
        name, pos = cstring(buf, pos, end)
        out.append(name)
    return out


def command_rows(tag: bytes) -> int | None:
    """Rows from a CommandComplete tag ("INSERT 0 5", "DELETE 3", "SELECT 7"), if any."""
    last = tag.rsplit(b" ", 1)[-1]
    return int(last) if last.isdigit() and b" " in tag else None


# PostgreSQL client encodings -> Python codecs. SQL_ASCII passes bytes through unchanged,
# which latin-1 reproduces one to one. An encoding missing here is not guessed at.
_CODECS = {
    "UTF8": "utf-8",
    "SQL_ASCII": "latin-1",
    **{
        f"LATIN{n}": f"iso8859_{p}"
        for n, p in zip(range(1, 11), (1, 2, 3, 4, 9, 10, 13, 14, 15, 16), strict=True)
    },
    **{f"ISO_8859_{n}": f"iso8859_{n}" for n in (5, 6, 7, 8)},
    **{
        f"WIN{n}": f"cp{n}"
        for n in (866, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258)
    },
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
    "EUC_JP": "euc_jp",
    "EUC_CN": "gb2312",
    "EUC_KR": "euc_kr",
    "EUC_JIS_2004": "euc_jis_2004",
    "SJIS": "shift_jis",
    "SHIFT_JIS_2004": "shift_jis_2004",
    "BIG5": "big5",
    "GBK": "gbk",
    "GB18030": "gb18030",
    "UHC": "cp949",
    "JOHAB": "johab",
}
UNKNOWN_CODEC = "unknown"  # no codec has this name: every decode with it fails


def python_codec(client_encoding: str) -> str:
    """The Python codec for a PostgreSQL client_encoding, or `UNKNOWN_CODEC` (statements
    are then treated as unparseable: never a guess)."""
    return _CODECS.get(client_encoding.upper().replace("-", "_"), UNKNOWN_CODEC)


def without_channel_binding(buf: bytes | bytearray, pos: int, end: int) -> bytes | None:
    """The Authentication message at `pos` without the -PLUS SASL mechanisms, when it is an
    AuthenticationSASL that offers any next to others; else None (keep it). They bind SCRAM
    to the server's TLS session, which an app talking plaintext to its sidecar is not in;
    and libpq refuses a server that offers one over a non-SSL connection."""
    if auth_code(buf, pos + 5, end) != AUTH_SASL:
        return None
    offered = sasl_mechanisms(buf, pos + 9, end)
    kept = [m for m in offered if not m.endswith(b"-PLUS")]
    if not kept or len(kept) == len(offered):
        return None
    return authentication_sasl(kept)


# -- builders ---------------------------------------------------------------------------


def message(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body) + 4) + body


def error_response(
    code: str,
    text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    fields = [(b"S", severity), (b"V", severity), (b"C", code), (b"M", text)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    body = b"".join(k + v.encode("utf-8", "replace") + b"\0" for k, v in fields) + b"\0"
    return message(b"E", body)


def error_message(fields: dict[str, str]) -> bytes:
    """An ErrorResponse with exactly these fields (code letter -> value)."""
    body = b"".join(k.encode() + v.encode("utf-8", "replace") + b"\0" for k, v in fields.items())
    return message(b"E", body + b"\0")


def authentication_sasl(mechanisms: list[bytes]) -> bytes:
    body = b"".join(m + b"\0" for m in mechanisms) + b"\0"
    return message(b"R", _INT32.pack(AUTH_SASL) + body)


def query(text: bytes) -> bytes:
    return message(b"Q", text + b"\0")


def parse(name: bytes, text: bytes) -> bytes:
    return message(b"P", name + b"\0" + text + b"\0" + _UINT16.pack(0))


def bind(portal: bytes, statement: bytes) -> bytes:
    # No parameter formats, no parameters, no result formats.
    return message(b"B", portal + b"\0" + statement + b"\0" + b"\0\0\0\0\0\0")


def execute(portal: bytes) -> bytes:
    return message(b"E", portal + b"\0" + _INT32.pack(0))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def raise_statement(
    code: str, text: str, *, detail: str | None = None, hint: str | None = None
) -> str:
    """A statement that makes the server itself raise `code` with `text`.

    Denials are raised by the server, not forged by the sidecar, so that the server's own
    transaction state follows: inside BEGIN the transaction is aborted until ROLLBACK,
    exactly as if the server had refused the statement. Texts are stripped of backslashes
    and control characters so that no quoting mode can change their meaning.
    """
    parts = [f"ERRCODE = '{code}'", f"MESSAGE = {_literal(text)}"]
    if detail:
        parts.append(f"DETAIL = {_literal(detail)}")
    if hint:
        parts.append(f"HINT = {_literal(hint)}")
    body = f"BEGIN RAISE EXCEPTION USING {', '.join(parts)}; END"
    tag = "sluice"
    while f"${tag}$" in body:
        tag += "_"
    return f"DO ${tag}${body}${tag}$"


def _literal(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in text)
    clean = clean.replace("\\", "/").replace("'", "''")
    return f"'{clean}'"
