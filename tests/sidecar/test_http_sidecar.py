"""The HTTP sidecar against real servers (nginx from Debian, the Python origin) with real
clients (curl, httpx, wrk, and raw sockets where a client library would hide the bytes)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from sidecar.config import HttpTimeouts, Route, SidecarConfig, load_config
from tests.sidecar.conftest import RunningSidecar
from tests.sidecar.httporigin import INDEX, Nginx, OriginServer
from tests.sidecar.webguard import add_rules, web_guard

WEB_POLICY = web_guard(
    post_budget="{rate: 2, per: 1s, burst: 2}",
    paced="{rate: 5, per: 1s, burst: 1}",
    rules="""\
    - name: reporting-read-only
      from: [reporting]
      http: {methods: [POST, PUT, PATCH, DELETE]}
      action: deny
    - name: no-ws
      http: {paths: ["/ws-denied"]}
      action: deny
    """,
)

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light; make install)")
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    server = OriginServer()
    yield server
    server.stop()


@pytest.fixture
def web(start_sidecar: Callable[..., RunningSidecar]) -> Callable[..., RunningSidecar]:
    def start(upstream_port: int, **kw: object) -> RunningSidecar:
        kw.setdefault("app", "shop")
        return start_sidecar(
            kw.pop("policy", WEB_POLICY),
            upstream=("127.0.0.1", upstream_port),
            service="web",
            protocol="http",
            **kw,
        )

    return start


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20
    )


def raw(port: int, data: bytes, *, until: Callable[[bytes], bool], timeout: float = 5) -> bytes:
    """Send bytes on one connection and read until `until(received)` or the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while not until(out) and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def statuses(data: bytes) -> list[int]:
    """Status codes of the responses in `data` (bodies here never contain a status line)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


# Allowed traffic, denials, limits: curl and httpx against nginx.


def test_allowed_get_reaches_nginx_and_keeps_the_connection(
    nginx: Nginx, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(nginx.port)
    url = f"http://127.0.0.1:{sc.port}/index.html"
    out = curl("-v", url, url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.encode() == INDEX * 2
    assert "Re-using existing connection" in out.stderr or "Reusing existing" in out.stderr
    events = sc.events(lambda e: len(e) >= 2)
    assert [e.status for e in events] == [200, 200]
    assert events[0].session == events[1].session  # one app connection, kept alive
    e = events[0]
    assert (e.protocol, e.decision, e.method, e.path, e.verbs) == (
        "http",
        "allow",
        "GET",
        "/index.html",
        ("GET",),
    )
    assert e.host == f"127.0.0.1:{sc.port}" and e.service == "web" and e.app == "shop"
    assert e.bytes_out is not None and e.bytes_out > len(INDEX) and e.bytes_in
    assert e.statement == "GET /index.html" and e.duration_ms is not None


def test_denied_path_gets_403_json_and_the_session_goes_on(
    nginx: Nginx, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(nginx.port)
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        denied = client.get("/admin/index.html")
        assert denied.status_code == 403
        body = denied.json()
        assert body["policy"] == "web-guard" and body["rule"] == "web-guard/no-admin"
        assert "admin is off limits" in body["message"]
        ok = client.get("/index.html")
        assert ok.status_code == 200 and ok.content == INDEX
    events = sc.events(lambda e: len(e) >= 2)
    assert [(e.decision, e.status) for e in events] == [("deny", 403), ("allow", 200)]
    assert events[0].session == events[1].session
    assert events[0].rule == "web-guard/no-admin"


@pytest.mark.parametrize(
    "target",
    [
        "/admin/index.html",
        "/x/../admin/index.html",
        "/%61dmin/index.html",
        "//admin/index.html",
        "/admin/./index.html",
        "/./admin",
        "/admin",
        "/static/%2E%2E/admin/index.html",
    ],
)
def test_path_evasions_are_denied(
    nginx: Nginx, web: Callable[..., RunningSidecar], target: str
) -> None:
    sc = web(nginx.port)
    out = raw(
        sc.port, f"GET {target} HTTP/1.1\r\nHost: web\r\n\r\n".encode(), until=lambda b: b"}" in b
    )
    assert statuses(out) == [403], out


@pytest.mark.parametrize(
    ("target", "status"),
    [("/admin%2Findex.html", 400), ("/a\\..\\admin", 400), ("/%zz", 400), ("/a%00b", 400)],
)
def test_ambiguous_targets_are_refused(
    origin: OriginServer, web: Callable[..., RunningSidecar], target: str, status: int
) -> None:
    sc = web(origin.port)
    before = len(origin.seen)
    out = raw(
        sc.port, f"GET {target} HTTP/1.1\r\nHost: web\r\n\r\n".encode(), until=lambda b: False
    )
    assert statuses(out) == [status]
    assert b"Connection: close" in out
    assert len(origin.seen) == before  # never reached the origin


def test_the_origin_sees_the_normalised_target(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    r = httpx.get(f"http://127.0.0.1:{sc.port}/a/b/../%63//d?x=%2F&y=1")
    assert r.status_code == 200
    assert r.json()["target"] == "/a/c/d?x=%2F&y=1"


def test_header_rule(nginx: Nginx, web: Callable[..., RunningSidecar]) -> None:
    sc = web(nginx.port)
    base = f"http://127.0.0.1:{sc.port}/index.html"
    assert httpx.get(base, headers={"X-Debug": "0"}).status_code == 200
    assert (
        httpx.get(base, headers={"X-Debug": "TRUE"}).status_code == 403
    )  # values match case-insensitively
    assert httpx.get(base, headers={"X-Debug": "true"}).status_code == 403
    assert httpx.get(base, headers={"x-debug": "1"}).status_code == 403


def test_source_app_rule(nginx: Nginx, web: Callable[..., RunningSidecar]) -> None:
    reporting = web(nginx.port, app="reporting")
    shop = web(nginx.port)
    r = httpx.post(f"http://127.0.0.1:{reporting.port}/echo-status", content=b"x")
    assert r.status_code == 403 and r.json()["rule"] == "web-guard/reporting-read-only"
    assert httpx.post(f"http://127.0.0.1:{shop.port}/echo-status", content=b"x").status_code == 201


def test_limit_gives_429_with_retry_after(nginx: Nginx, web: Callable[..., RunningSidecar]) -> None:
    sc = web(nginx.port)
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        codes = [client.post("/orders", content=b"{}") for _ in range(4)]
    assert [r.status_code for r in codes[:2]] != [429, 429]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    assert limited[0].headers["Retry-After"] == "1"
    assert limited[0].json()["rule"] == "web-guard/post-budget"
    assert "slow down" in limited[0].json()["message"]
    events = sc.events(lambda e: len(e) >= 4)
    assert [e.decision for e in events].count("reject") == len(limited)


def test_delay_holds_the_request(origin: OriginServer, web: Callable[..., RunningSidecar]) -> None:
    sc = web(origin.port)
    started = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        codes = [client.put("/paced", content=b"x").status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    assert time.monotonic() - started >= 0.3  # 5/s with a burst of 1: two waits of ~0.2 s
    events = sc.events(lambda e: len(e) >= 3)
    assert [e.decision for e in events][1:] == ["delay", "delay"]


def test_dry_run_rule_forwards_and_audits_would_deny(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    assert httpx.delete(f"http://127.0.0.1:{sc.port}/orders/7").status_code == 200
    (event,) = sc.events(lambda e: len(e) >= 1)
    assert (event.decision, event.action, event.enforced) == ("allow", "deny", False)
    assert event.rules == ("web-guard/shadow-delete",)


def test_query_string_is_left_out_of_the_audit_unless_configured(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    plain = web(origin.port)
    full = web(origin.port, full_statements=True)
    httpx.get(f"http://127.0.0.1:{plain.port}/search?card=4111")
    httpx.get(f"http://127.0.0.1:{full.port}/search?card=4111")
    assert plain.events(lambda e: len(e) >= 1)[0].path == "/search"
    assert full.events(lambda e: len(e) >= 1)[0].path == "/search?card=4111"


def test_policy_edit_takes_effect_on_the_open_connection(
    nginx: Nginx, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(nginx.port)
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        assert client.get("/index.html").status_code == 200
        sc.write_policy(WEB_POLICY.replace('"/admin/**"', '"/index.html"'))
        deadline = time.monotonic() + 5
        while client.get("/index.html").status_code != 403:
            assert time.monotonic() < deadline, "the edited policy never took effect"
            time.sleep(0.05)


# Framing: bodies, pipelining, HEAD, upgrades, connection reuse.


def test_chunked_request_body_arrives_whole(
    origin: OriginServer, web: Callable[..., RunningSidecar], tmp_path: Path
) -> None:
    sc = web(origin.port)
    payload = tmp_path / "body.bin"
    payload.write_bytes(b"0123456789" * 5000)
    out = curl(
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{payload}",
        f"http://127.0.0.1:{sc.port}/upload",
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["body"] == "0123456789" * 5000
    event = sc.events(lambda e: len(e) >= 1)[0]
    assert event.bytes_in is not None and event.bytes_in >= 50_000


def test_chunked_and_close_delimited_responses(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        r = client.get("/chunked")
        assert r.text == "first,second,third"
        assert client.get("/index").status_code == 200  # the same connection goes on
    r = httpx.get(f"http://127.0.0.1:{sc.port}/close-delimited")
    assert r.text == "until the server closes"
    events = sc.events(lambda e: len(e) >= 3)
    assert [e.status for e in events] == [200, 200, 200]


def test_pipelined_requests_are_answered_in_order(
    nginx: Nginx, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(nginx.port)
    req = b"GET /index.html HTTP/1.1\r\nHost: web\r\n\r\n"
    denied = b"GET /admin/index.html HTTP/1.1\r\nHost: web\r\n\r\n"
    head = b"HEAD /index.html HTTP/1.1\r\nHost: web\r\n\r\n"
    out = raw(
        sc.port,
        req + denied + head + req + denied,
        until=lambda b: b.count(b"HTTP/1.1 ") >= 5 and b.endswith(b"}"),
    )
    assert statuses(out) == [200, 403, 200, 200, 403]
    assert out.count(INDEX) == 2  # HEAD answered without a body


def test_websocket_upgrade_becomes_a_tunnel(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        s.sendall(b"hello tunnel")
        got = b""
        while len(got) < 12:
            got += s.recv(4096)
        assert got == b"HELLO TUNNEL"


def test_denied_upgrade_keeps_the_connection_for_http(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    up = (
        b"GET /ws-denied HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    nxt = b"GET /after HTTP/1.1\r\nHost: web\r\n\r\n"
    out = raw(sc.port, up + nxt, until=lambda b: statuses(b) == [403, 200] and b.endswith(b"}"))
    assert statuses(out) == [403, 200]


def test_idle_upstream_close_reconnects(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        assert client.get("/one").status_code == 200
        time.sleep(0.8)  # the origin drops idle connections after 0.5 s
        assert client.get("/two").status_code == 200
    events = sc.events(lambda e: len(e) >= 2)
    assert events[0].session == events[1].session


# Bad input and failures.


def test_malformed_request_gets_400_and_close(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    out = raw(
        sc.port, b"GET / HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n", until=lambda b: False
    )
    assert statuses(out) == [400] and b"Connection: close" in out
    out = raw(sc.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", until=lambda b: False)
    assert statuses(out) == [400]
    assert httpx.get(f"http://127.0.0.1:{sc.port}/still-serving").status_code == 200


def test_request_smuggling_forms_are_refused(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    before = len(origin.seen)
    te_cl = b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    cl_cl = b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
    for attack in (te_cl, cl_cl):
        assert statuses(raw(sc.port, attack, until=lambda b: False)) == [400]
    assert len(origin.seen) == before


def test_oversized_headers_get_431_and_long_targets_414(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port)
    big = (
        b"GET / HTTP/1.1\r\nHost: web\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
        + b"\r\n"
    )
    assert statuses(raw(sc.port, big, until=lambda b: False)) == [431]
    long = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: web\r\n\r\n"
    assert statuses(raw(sc.port, long, until=lambda b: False)) == [414]


def test_missing_host_is_refused(origin: OriginServer, web: Callable[..., RunningSidecar]) -> None:
    sc = web(origin.port)
    assert statuses(raw(sc.port, b"GET / HTTP/1.1\r\n\r\n", until=lambda b: False)) == [400]


def test_unreachable_upstream_gets_502_json(web: Callable[..., RunningSidecar]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connections are refused
        sc = web(dead, connect_timeout=1.0)
        r = httpx.get(f"http://127.0.0.1:{sc.port}/index.html")
    assert r.status_code == 502
    body = r.json()
    assert body["service"] == "web" and "refused" in body["message"].lower()
    (event,) = sc.events(lambda e: len(e) >= 1)
    assert event.status == 502


def test_slow_client_head_times_out_with_408(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port, http=HttpTimeouts(head=0.5, body=0.5, idle=1.0))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHo")  # and never the rest
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    assert statuses(out) == [408]
    assert time.monotonic() - started < 3


def test_idle_keep_alive_is_closed(
    origin: OriginServer, web: Callable[..., RunningSidecar]
) -> None:
    sc = web(origin.port, http=HttpTimeouts(head=5, body=5, idle=0.5))
    with socket.create_connection(("127.0.0.1", sc.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        time.sleep(0.1)
        first = s.recv(65536)
        assert statuses(first) == [200]
        started = time.monotonic()
        assert s.recv(4096) == b""  # closed by the sidecar, silently
        assert time.monotonic() - started < 3


# Load: wrk through the sidecar with every response checked.


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_wrk_through_the_sidecar(nginx: Nginx, web: Callable[..., RunningSidecar]) -> None:
    sc = web(nginx.port, record="non-allow")
    out = subprocess.run(
        ["wrk", "-t1", "-c8", "-d1s", f"http://127.0.0.1:{sc.port}/index.html"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Non-2xx" not in out.stdout and "Socket errors" not in out.stdout, out.stdout
    requests = int(out.stdout.split(" requests in ")[0].split()[-1])
    assert requests > 500, out.stdout


def test_audit_ids_are_unique_across_routes(origin: OriginServer, tmp_path: Path) -> None:
    policy = tmp_path / "web.yaml"
    policy.write_text(WEB_POLICY)
    routes = tuple(
        Route(name, "http", ("127.0.0.1", 0), ("127.0.0.1", origin.port)) for name in ("web", "api")
    )
    sc = RunningSidecar(SidecarConfig("shop", "shop-1", (str(policy),), routes), policy)
    try:
        assert sc.sidecar is not None
        for host, port in sc.sidecar.addresses():
            for _ in range(3):
                assert httpx.get(f"http://{host}:{port}/x").status_code == 200
        events = sc.events(lambda e: len(e) >= 6)
        assert {e.service for e in events} == {"web", "api"}
        assert len({e.id for e in events}) == 6
    finally:
        sc.stop()


def test_limit_keyed_by_path(origin: OriginServer, web: Callable[..., RunningSidecar]) -> None:
    policy = add_rules(
        WEB_POLICY,
        """\
        - name: per-path
          http: {methods: [GET], paths: ["/items/**"]}
          action: limit
          limit: {rate: 1, per: 60s, burst: 1, scope: source-app, key: path}
        """,
    )
    sc = web(origin.port, policy=policy)
    with httpx.Client(base_url=f"http://127.0.0.1:{sc.port}") as client:
        assert client.get("/items/1").status_code == 200
        assert client.get("/items/1").status_code == 429  # that path's bucket is empty
        assert client.get("/items/2").status_code == 200  # another path, its own bucket
        assert client.get("/items/%31").status_code == 429  # the same path, normalised


def test_example_config_runs_the_dry_run_policy(origin: OriginServer, tmp_path: Path) -> None:
    """examples/sidecar/reporting.yaml with examples/policies: writes to /v1/payments are
    forwarded and audited as would-deny (the example's dry run)."""
    example = Path(__file__).parents[2] / "examples" / "sidecar" / "reporting.yaml"
    config = load_config(example)
    (route,) = config.routes
    assert (route.protocol, route.listen, route.http) == (
        "http",
        ("127.0.0.1", 8081),
        HttpTimeouts(),
    )
    route = replace(route, listen=("127.0.0.1", 0), upstream=("127.0.0.1", origin.port))
    config = replace(config, routes=(route,), audit=replace(config.audit, path=None))
    sc = RunningSidecar(config, Path(config.policies[0]))
    try:
        r = httpx.post(f"http://127.0.0.1:{sc.port}/v1/payments/7/refund", content=b"{}")
        assert r.status_code == 200
        (event,) = sc.events(lambda e: len(e) >= 1)
        assert (event.decision, event.action, event.enforced) == ("allow", "deny", False)
        assert event.rule == "payments-http/reporting-read-only"
    finally:
        sc.stop()
