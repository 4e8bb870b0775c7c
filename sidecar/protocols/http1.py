"""HTTP/1.1 for the sidecar, sans-I/O: request targets, response framing, local answers.

Requests are parsed by httptools (llhttp, Node's strict parser) in `sidecar/http_session.py`;
this module holds what the session needs around it and the mitmproxy addon reuses:

- `normalize_target`: the request target as policies see it and as it is forwarded. The
  server must act on exactly the path that was decided, so the sidecar forwards the
  normalised form, never the original (a deny rule on `/admin/**` must not be dodged by
  `/x/../admin`, `/%61dmin` or `//admin`).
- `ResponseFramer`: where each upstream response ends (Content-Length, chunked, HEAD, 1xx,
  204/304, close-delimited, 101 Switching Protocols) without copying the body, so requests
  and responses stay paired under pipelining and every response gets its audit record.
- `local_response`: the sidecar's own answers (403, 429, 400, 431, 502...) as JSON, with
  the bodies of a denial (`denial`) and of an exceeded limit (`limit_answer`) that the
  plaintext session and the mitmproxy addon (`sidecar/mitm_addon.py`) both send.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from policies.engine import Decision, LimitTicket

# Request line plus headers: above this the app gets 431 (nginx's large_client_header_buffers
# default is 4 x 8 KB; Node's is 16 KB). A bounded head also bounds memory per connection.
MAX_HEAD = 32 * 1024
# A request target above this gets 414.
MAX_TARGET = 8 * 1024
# A response head above this from the upstream is a bad gateway (502).
MAX_RESPONSE_HEAD = 64 * 1024

STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class BadRequest(Exception):
    """A request the sidecar answers itself with `status` and closes the connection on."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Target(NamedTuple):
    """A normalised request target (a tuple: built once per request on the hot path)."""

    path: str  # what policies match: dot-segments resolved, unreserved bytes decoded
    query: str  # without the '?'; "" when absent
    host: str | None  # from an absolute-form target, else None (the Host header decides)

    @property
    def forward(self) -> bytes:
        """The target sent upstream: the path that was decided, and the query unchanged."""
        text = f"{self.path}?{self.query}" if self.query else self.path
        return text.encode("ascii")


def normalize_target(raw: bytes) -> Target:
    """The target of a request line as policies see it (RFC 3986 section 6.2.2).

    Percent-encoded unreserved characters are decoded and other escapes upper-cased,
    duplicate slashes merged, dot-segments removed. An encoded slash or backslash
    (`%2F`, `%5C`), a raw backslash and an encoded NUL are refused (400): servers disagree
    on whether they separate segments, so no one reading of them is safe to decide on.
    """
    host = None
    if raw.startswith((b"http://", b"https://")):  # absolute-form (RFC 9112 3.2.2)
        rest = raw.split(b"//", 1)[1]
        slash = rest.find(b"/")
        authority, raw = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        host = authority.rsplit(b"@", 1)[-1].decode("ascii", "replace").lower()
    elif raw == b"*":
        return Target("*", "", None)
    elif not raw.startswith(b"/"):
        raise BadRequest(400, "the request target must be an absolute path")
    raw = raw.split(b"#", 1)[0]
    if not raw.isascii():
        raise BadRequest(400, "the request target has bytes outside ASCII (not percent-encoded)")
    path, _, query = raw.partition(b"?")
    if b"%" not in path and b"//" not in path and b"/." not in path and b"\\" not in path:
        return Target(path.decode("ascii"), query.decode("ascii"), host)
    if b"\\" in path:
        raise BadRequest(400, "a backslash in the request path is refused")
    if b"%" in path:
        path = _decode_unreserved(path)
    while b"//" in path:
        path = path.replace(b"//", b"/")
    path = _remove_dot_segments(path)
    return Target(path.decode("ascii"), query.decode("ascii"), host)


def _decode_unreserved(path: bytes) -> bytes:
    i = path.find(b"%")
    while i >= 0:
        if len(path) < i + 3 or path[i + 1] not in _HEX or path[i + 2] not in _HEX:
            raise BadRequest(400, "a malformed percent-escape in the request path")
        i = path.find(b"%", i + 3)

    def one(m: re.Match[bytes]) -> bytes:
        byte = int(m.group(1), 16)
        if byte in (0x2F, 0x5C):
            raise BadRequest(400, "an encoded slash or backslash in the request path is refused")
        if byte == 0:
            raise BadRequest(400, "an encoded NUL in the request path is refused")
        if byte in _UNRESERVED:
            return bytes((byte,))
        return b"%" + m.group(1).upper()

    return _PCT.sub(one, path)


def _remove_dot_segments(path: bytes) -> bytes:
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == b".":
            if last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


def local_response(
    status: int,
    body: Mapping[str, object],
    *,
    close: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete response of the sidecar's own, with a JSON body."""
    payload = json_body(body)
    lines = [
        f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
    ]
    lines.extend(f"{k}: {v}" for k, v in extra)
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def json_body(body: Mapping[str, object]) -> bytes:
    """The bytes of a JSON body of the sidecar's own (compact, UTF-8)."""
    return json.dumps(body, separators=(",", ":")).encode()


def denial(decision: Decision) -> dict[str, object]:
    """The JSON body of a 403: the policy and rule that denied, and the rule's message."""
    if decision.rule is not None:
        text = f"sluice: request denied by policy {decision.policy}, rule {decision.rule}"
        if decision.message:
            text = f"{text}: {decision.message}"
    else:
        text = f"sluice: request denied by policy {decision.policy}: {decision.reason}"
    return {
        "error": "denied",
        "policy": decision.policy,
        "rule": decision.rule,
        "message": text,
    }


def limit_message(rule_id: str, message: str | None) -> str:
    text = f"sluice: rate limit {rule_id} exceeded"
    return f"{text}: {message}" if message else text


def limit_answer(ticket: LimitTicket) -> tuple[dict[str, object], int]:
    """The JSON body of a 429 for the limit that could not grant a token, and its
    Retry-After in whole seconds (the time one token takes to come back, at least 1)."""
    limit = ticket.limit
    body: dict[str, object] = {
        "error": "rate limited",
        "rule": ticket.rule_id,
        "limit": f"{limit.rate:g} per {limit.per:g}s",
        "message": limit_message(ticket.rule_id, ticket.message),
    }
    return body, max(1, math.ceil(limit.per / limit.rate))


# Response framing.

_NEED_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE, _TUNNEL = range(7)


class UpstreamError(Exception):
    """The upstream sent something that is not an HTTP/1.x response (502 to the app)."""


class ResponseFramer:
    """Finds where responses end in the upstream's byte stream; the bytes pass unchanged.

    `feed(data, is_head)` returns how many responses completed in `data`; `ends` holds
    where each ended (offsets into `data`), `statuses` their status codes and `sizes` their
    byte counts, in order (the caller clears all three). `is_head(k)` says whether the
    response after the k first completed ones answers a HEAD request (no body whatever its
    headers say). Interim 1xx responses pass and complete nothing; 101 completes its
    request and turns the stream into a tunnel (`tunnel` becomes True).
    """

    __slots__ = ("_buf", "_left", "_state", "ends", "size", "sizes", "status", "statuses", "tunnel")

    def __init__(self) -> None:
        self._state = _NEED_HEAD
        self._buf = b""  # a partial head or chunk-size line
        self._left = 0  # body or chunk bytes still to come
        self.status = 0  # of the response being read
        self.size = 0  # its bytes so far
        self.ends: list[int] = []
        self.statuses: list[int] = []
        self.sizes: list[int] = []
        self.tunnel = False

    @property
    def idle(self) -> bool:
        """No response is partly read."""
        return self._state == _NEED_HEAD and not self._buf

    def closed(self) -> bool:
        """The upstream closed: True when that ended a close-delimited response (recorded
        as ending at offset 0 of no data)."""
        if self._state == _UNTIL_CLOSE:
            self._done(0)
            return True
        return False

    def feed(self, data: bytes, is_head: Callable[[int], bool]) -> int:
        if self._state == _TUNNEL:
            return 0
        done = 0
        pos = 0
        base = 0  # offset of data[0] in the caller's data
        if self._buf:
            # A partial head or line is kept only when a read ended inside it: join it to
            # this read once; its bytes come before the caller's offset 0.
            base = -len(self._buf)
            data = self._buf + data
            self._buf = b""
        n = len(data)
        while pos < n:
            state = self._state
            if state == _LENGTH:
                take = min(self._left, n - pos)
                self._left -= take
                self.size += take
                pos += take
                if self._left == 0:
                    self._done(pos + base)
                    done += 1
            elif state == _NEED_HEAD:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > MAX_RESPONSE_HEAD:
                        raise UpstreamError("response head too large")
                    self._buf = data[pos:]
                    return done
                end += 4
                status, body = self._head(data[pos:end], is_head(done))
                self.size += end - pos
                pos = end
                if 100 <= status < 200:
                    if status == 101:
                        self._done(pos + base)
                        self.tunnel = True
                        self._state = _TUNNEL
                        return done + 1
                    continue  # interim: the final response follows
                if body is None or body == 0:
                    self._done(pos + base)
                    done += 1
                elif body == -1:
                    self._state = _CHUNK_SIZE
                elif body == -2:
                    self._state = _UNTIL_CLOSE
                else:
                    self._left = body
                    self._state = _LENGTH
            elif state == _CHUNK_DATA:
                take = min(self._left, n - pos)
                self._left -= take
                self.size += take
                pos += take
                if self._left == 0:
                    self._state = _CHUNK_SIZE
            elif state == _UNTIL_CLOSE:
                self.size += n - pos
                return done
            else:  # _CHUNK_SIZE or _TRAILER: one line at a time
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise UpstreamError("chunk-size or trailer line too long")
                    self._buf = data[pos:]
                    return done
                line = data[pos:eol]
                pos = eol + 2
                self.size += len(line) + 2
                if state == _TRAILER:
                    if not line:
                        self._done(pos + base)
                        done += 1
                    continue
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise UpstreamError(f"bad chunk size {line[:32]!r}") from None
                if size < 0:
                    raise UpstreamError("negative chunk size")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._left = size + 2  # the chunk and its CRLF
                    self._state = _CHUNK_DATA
        return done

    def _done(self, end: int) -> None:
        self.ends.append(end)
        self.statuses.append(self.status)
        self.sizes.append(self.size)
        self.size = 0
        self._state = _NEED_HEAD

    def _head(self, head: bytes, head_request: bool) -> tuple[int, int | None]:
        """The status and the body framing: None no body, -1 chunked, -2 until close, or
        the Content-Length."""
        if not head.startswith(b"HTTP/1.") or len(head) < 12 or head[12:13] not in b" \r":
            raise UpstreamError(f"not an HTTP/1.x status line: {head[:40]!r}")
        try:
            status = int(head[9:12])
        except ValueError:
            raise UpstreamError(f"bad status code in {head[:40]!r}") from None
        self.status = status
        if status < 200 or status in (204, 304) or head_request:
            return status, None
        low = head.lower()
        te = low.find(b"\r\ntransfer-encoding:")
        if te >= 0:
            value = low[te + 20 : low.find(b"\r\n", te + 2)].strip()
            if value.endswith(b"chunked"):
                return status, -1
            return status, -2
        cl = low.find(b"\r\ncontent-length:")
        if cl < 0:
            return status, -2
        value = low[cl + 17 : low.find(b"\r\n", cl + 2)].strip()
        if low.count(b"\r\ncontent-length:") > 1:
            values = {
                low[i + 17 : low.find(b"\r\n", i + 2)].strip()
                for i in _all(low, b"\r\ncontent-length:")
            }
            if len(values) != 1:
                raise UpstreamError("conflicting Content-Length headers")
        if not value.isdigit():
            raise UpstreamError(f"bad Content-Length {value[:20]!r}")
        return status, int(value)


def _all(text: bytes, needle: bytes) -> list[int]:
    out = []
    i = text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out
