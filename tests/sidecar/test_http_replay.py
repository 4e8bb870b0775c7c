"""The HTTP session replaying byte streams captured from real clients and servers (curl and
httpx against nginx and the Python origin: tests/sidecar/captures/record_http.py), fed whole
and one byte at a time; the request-target normaliser and the response framer on their own,
with hypothesis fuzzing both."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.attributes import Peer
from policies.engine import Engine
from policies.http_decider import HttpDecider
from policies.loader import load_texts
from sidecar.audit import MemorySink
from sidecar.http_session import HttpRouteContext, HttpSession
from sidecar.limits import Limiter
from sidecar.protocols.http1 import (
    BadRequest,
    ResponseFramer,
    UpstreamError,
    normalize_target,
)

CAPTURES = Path(__file__).parent / "captures"
ALLOW_ALL = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: open}
spec:
  destination: web
  rules:
    - name: no-deletes
      http: {methods: [DELETE]}
      action: deny
"""
NO_ADMIN = ALLOW_ALL.replace("{methods: [DELETE]}", '{paths: ["/admin/**"]}').replace(
    "no-deletes", "no-admin"
)


def session(policy: str = ALLOW_ALL) -> tuple[HttpSession, MemorySink]:
    engine = Engine(load_texts([("test.yaml", textwrap.dedent(policy))]))
    sink = MemorySink()
    ctx = HttpRouteContext(
        "shop", "shop-1", "web", HttpDecider(engine, Peer("shop", "web", "shop-1")), Limiter(), sink
    )
    return HttpSession(ctx, "s-1"), sink


def conversation(name: str) -> list[tuple[str, bytes]]:
    return [(d, bytes.fromhex(h)) for d, h in json.loads((CAPTURES / f"{name}.json").read_text())]


def replay(s: HttpSession, steps: list[tuple[str, bytes]], bytewise: bool) -> tuple[bytes, bytes]:
    to_server, to_client = bytearray(), bytearray()
    for direction, data in steps:
        pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for piece in pieces:
            if direction == "c":
                s.client_data(piece)
            else:
                s.server_data(piece)
            to_server += s.to_server
            s.to_server = bytearray()
            to_client += s.to_client
            s.to_client = bytearray()
    return bytes(to_server), bytes(to_client)


class _Requests:
    """httptools callbacks collecting (method, target, headers, body) per request."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"content-length",):
            self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.out.append((b"", self._url, self._headers, self._body))
        self._url, self._headers, self._body = b"", [], b""


def requests_of(data: bytes) -> list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]:
    collected = _Requests()
    httptools.HttpRequestParser(collected).feed_data(data)
    return collected.out


CASES = {
    "http_curl_nginx": [200, 404, 200, 200],
    "http_curl_origin": [200, 200, 200],
    "http_httpx_origin": [200, 200, 200, 200],
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_replay_passes_everything_through(name: str, bytewise: bool) -> None:
    steps = conversation(name)
    s, sink = session()
    to_server, to_client = replay(s, steps, bytewise)
    sent = b"".join(d for k, d in steps if k == "c")
    answered = b"".join(d for k, d in steps if k == "s")
    assert to_client == answered  # responses pass byte for byte
    assert requests_of(to_server) == requests_of(sent)  # the same requests, same bodies
    if not bytewise:
        assert to_server == sent  # whole reads: not even the framing changes
    assert [e.status for e in sink.events] == CASES[name]
    assert s.closing is None


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_replay_with_a_denied_request_in_the_middle(bytewise: bool) -> None:
    steps = conversation("http_curl_nginx")
    # the server never sees the denied request, so it never answers it
    steps = [st for i, st in enumerate(steps) if i != 5]
    assert steps[4][1].startswith(b"GET /admin/")
    s, sink = session(NO_ADMIN)
    to_server, to_client = replay(s, steps, bytewise)
    assert b"/admin/" not in to_server
    assert [e.status for e in sink.events] == [200, 404, 403, 200]
    assert [e.decision for e in sink.events] == ["allow", "allow", "deny", "allow"]
    assert to_client.count(b"HTTP/1.1 ") == 4
    assert b'"rule":"open/no-admin"' in to_client


def test_pipelined_answers_wait_for_earlier_responses() -> None:
    s, sink = session(NO_ADMIN)
    s.client_data(
        b"GET /a HTTP/1.1\r\nHost: web\r\n\r\nGET /admin/x HTTP/1.1\r\nHost: web\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: web\r\n\r\n"
    )
    assert s.to_client == b""  # the 403 waits for /a's response
    assert s.to_server.count(b"GET ") == 2
    s.server_data(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"
    )
    out = bytes(s.to_client)
    assert out.index(b"\r\n\r\na") < out.index(b"403 Forbidden") < out.rindex(b"200 OK")
    assert [e.status for e in sink.events] == [200, 403, 200]


# The request target as policies see it.


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        (b"/", "/", ""),
        (b"/a/b?x=1&y=%2F", "/a/b", "x=1&y=%2F"),
        (b"/a/./b/../c", "/a/c", ""),
        (b"/a/b/..", "/a/", ""),
        (b"/../../etc/passwd", "/etc/passwd", ""),
        (b"//a///b", "/a/b", ""),
        (b"/%61%64min", "/admin", ""),
        (b"/%2e%2E/admin", "/admin", ""),
        (b"/a%2e/b", "/a./b", ""),
        (b"/caf%c3%a9", "/caf%C3%A9", ""),
        (b"/a#frag", "/a", ""),
        (b"http://Example.COM:8080/x/../y?q", "/y", "q"),
        (b"*", "*", ""),
    ],
)
def test_normalize_target(raw: bytes, path: str, query: str) -> None:
    target = normalize_target(raw)
    assert (target.path, target.query) == (path, query)


def test_absolute_form_carries_the_host() -> None:
    assert normalize_target(b"http://user@Example.COM:8080/x").host == "example.com:8080"


@pytest.mark.parametrize(
    "raw", [b"/a%2Fb", b"/a%5cb", b"/a\\b", b"/a%00", b"/%zz", b"/%4", b"relative", b"/caf\xc3\xa9"]
)
def test_ambiguous_targets_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest) as exc:
        normalize_target(raw)
    assert exc.value.status == 400


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=60).map(lambda b: b"/" + b))
def test_normalize_target_never_leaves_dot_segments(raw: bytes) -> None:
    try:
        target = normalize_target(raw)
    except BadRequest:
        return
    segments = target.path.split("/")
    assert target.path.startswith("/")
    assert "." not in segments and ".." not in segments
    assert "//" not in target.path
    assert normalize_target(target.forward).path == target.path  # idempotent


# Response framing.

RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, [200]),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, [204]),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", False, [304]),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", True, [200]),  # HEAD
    (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        False,
        [201],
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: 1\r\n\r\n",
        False,
        [200],
    ),
]


@pytest.mark.parametrize(("data", "head", "expected"), RESPONSES)
def test_framer_whole_and_bytewise(data: bytes, head: bool, expected: list[int]) -> None:
    for step in (len(data), 1, 7):
        framer = ResponseFramer()
        done = 0
        ends: list[int] = []
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            done += framer.feed(piece, lambda k: head)
            ends += [i + e for e in framer.ends]
            framer.ends.clear()
        assert framer.statuses == expected and done == len(expected)
        assert ends == [len(data)]
        assert framer.sizes == [len(data)]
        assert framer.idle


def test_framer_splits_back_to_back_responses() -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
    b = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n"
    framer = ResponseFramer()
    assert framer.feed(a + b + a, lambda k: False) == 3
    assert framer.ends == [len(a), len(a + b), len(a + b + a)]


def test_framer_close_delimited_and_upgrade() -> None:
    framer = ResponseFramer()
    assert framer.feed(b"HTTP/1.0 200 OK\r\n\r\nbody until close", lambda k: False) == 0
    assert framer.closed() and framer.statuses == [200]
    framer = ResponseFramer()
    assert framer.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\nraw", lambda k: False) == 1
    assert framer.tunnel


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_framer_rejects_garbage(data: bytes) -> None:
    with pytest.raises(UpstreamError):
        ResponseFramer().feed(data, lambda k: False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_framer_never_fails_but_with_upstream_error(data: bytes, step: int) -> None:
    framer = ResponseFramer()
    try:
        for i in range(0, len(data), step):
            framer.feed(data[i : i + step], lambda k: False)
    except UpstreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_session_survives_any_client_bytes(data: bytes) -> None:
    s, _ = session()
    s.client_data(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n" + data)
    s.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert s.to_client.startswith(b"HTTP/1.1 200 OK")
