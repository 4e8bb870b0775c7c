"""The mitmproxy addon (sidecar/mitm_addon.py) in real `mitmdump` processes from .venv-mitm,
against real origins (a Python HTTP/WebSocket origin; nginx over TLS with HTTP/2) with real
clients (httpx from this venv, curl, a WebSocket handshake on a raw socket): reverse mode
on plaintext, inspection mode, HTTPS interception in regular mode with mitmproxy's CA,
HTTP/2, and WebSocket upgrades. One mitmdump per mode, shared by the module's tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.sidecar.httporigin import OriginServer, free_port
from tests.sidecar.mitmservers import (
    MITMDUMP,
    Mitmdump,
    TlsNginx,
    WebSocketClient,
    WebSocketEchoHandler,
)
from tests.sidecar.webguard import web_guard

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not MITMDUMP.exists(),
        reason=f"{MITMDUMP} is missing: `make mitm` builds mitmproxy's own virtualenv",
    ),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

POLICIES = web_guard(
    post_budget="{rate: 1, per: 10s, burst: 2}",
    paced="{rate: 2, per: 1s, burst: 1}",
    rules="""\
    - name: no-ws-admin
      http: {paths: ["/ws/admin"]}
      action: deny
    """,
) + textwrap.dedent(
    """\
    ---
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: partner-guard}
    spec:
      destination: partner-api
      rules:
        - name: no-admin
          http: {paths: ["/admin/**"]}
          action: deny
          message: not through the proxy
    """
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mitm")
    (path / "policies").mkdir()
    (path / "policies" / "guard.yaml").write_text(POLICIES)
    return path


@pytest.fixture(scope="module")
def origin() -> Iterator[OriginServer]:
    server = OriginServer(WebSocketEchoHandler)
    yield server
    server.stop()


def _reverse(workdir: Path, origin: OriginServer, name: str, *options: str) -> Mitmdump:
    return Mitmdump(
        workdir / name,
        f"reverse:http://127.0.0.1:{origin.port}",
        "sluice_app=billing",
        "sluice_service=web",
        f"sluice_policies={workdir / 'policies'}",
        *options,
    )


@pytest.fixture(scope="module")
def reverse(workdir: Path, origin: OriginServer) -> Iterator[Mitmdump]:
    proxy = _reverse(workdir, origin, "reverse")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def inspecting(workdir: Path, origin: OriginServer) -> Iterator[Mitmdump]:
    proxy = _reverse(
        workdir,
        origin,
        "inspect",
        "sluice_inspect=true",
        "sluice_audit=non-allow",
        "sluice_full_paths=true",
    )
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def nginx_tls(workdir: Path) -> Iterator[TlsNginx]:
    server = TlsNginx(workdir / "nginx")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def regular(workdir: Path) -> Iterator[Mitmdump]:
    proxy = Mitmdump(
        workdir / "regular",
        "regular",
        "sluice_app=billing",
        "sluice_services=localhost=partner-api",
        f"sluice_policies={workdir / 'policies'}",
        "ssl_insecure=true",  # the origin's certificate is self-signed
    )
    yield proxy
    proxy.stop()


def at(event: dict[str, object], method: str, path: str) -> bool:
    return event["method"] == method and event["path"] == path


# Reverse mode, plaintext


def test_allowed_request_passes_and_is_audited(reverse: Mitmdump, origin: OriginServer) -> None:
    r = httpx.get(f"http://127.0.0.1:{reverse.port}/hello?x=1")
    assert r.status_code == 200
    assert r.json()["target"] == "/hello?x=1"
    e = reverse.wait_event(lambda e: at(e, "GET", "/hello"))  # no query in the audit trail
    assert e["protocol"] == "http"
    assert (e["app"], e["service"], e["decision"], e["action"]) == (
        "billing",
        "web",
        "allow",
        "allow",
    )
    assert e["enforced"] is True and e["status"] == 200 and e["statement"] == "GET /hello"
    assert e["host"] == f"127.0.0.1:{origin.port}"  # reverse mode: the Host the server gets
    assert isinstance(e["bytes_in"], int) and e["bytes_in"] > 0
    assert isinstance(e["bytes_out"], int) and e["bytes_out"] > len(r.content)
    assert isinstance(e["duration_ms"], float) and e["duration_ms"] >= 0


def test_denied_path_gets_403_naming_policy_and_rule(
    reverse: Mitmdump, origin: OriginServer
) -> None:
    # The decided path is the normalised one, which is also what goes upstream.
    out = subprocess.run(
        ["curl", "-s", "--path-as-is", "-w", "\n%{http_code}", f"http://127.0.0.1:{reverse.port}/x/../%61dmin/panel"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(body) == {
        "error": "denied",
        "policy": "web-guard",
        "rule": "web-guard/no-admin",
        "message": "sluice: request denied by policy web-guard, rule web-guard/no-admin: admin is off limits",
    }
    assert not any(p.startswith("/admin") for _, p in origin.requests())
    e = reverse.wait_event(lambda e: at(e, "GET", "/admin/panel"))
    assert (e["decision"], e["action"], e["rule"], e["status"]) == (
        "deny",
        "deny",
        "web-guard/no-admin",
        403,
    )
    r = httpx.get(f"http://127.0.0.1:{reverse.port}/a/./b/../c")
    assert r.json()["target"] == "/a/c"


def test_header_rule_and_bad_target(reverse: Mitmdump) -> None:
    base = f"http://127.0.0.1:{reverse.port}"
    assert httpx.get(f"{base}/debug", headers={"X-Debug": "true"}).status_code == 403
    assert httpx.get(f"{base}/debug", headers={"X-Debug": "no"}).status_code == 200
    r = httpx.get(f"{base}/a%2Fadmin")  # an encoded slash: no one reading is safe to decide on
    assert r.status_code == 400 and "encoded slash" in r.json()["message"]
    e = reverse.wait_event(lambda e: e["status"] == 400)
    assert e["decision"] == "deny" and e["path"] is None


def test_limit_gives_429_with_retry_after(reverse: Mitmdump) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{reverse.port}") as client:
        statuses = [client.post("/orders", content=b"{}") for _ in range(4)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]
    rejected = statuses[-1]
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "10"
    assert rejected.json()["rule"] == "web-guard/post-budget"
    assert (
        rejected.json()["message"] == "sluice: rate limit web-guard/post-budget exceeded: slow down"
    )
    e = reverse.wait_event(lambda e: at(e, "POST", "/orders") and e["status"] == 429)
    assert (e["decision"], e["action"]) == ("reject", "limit")


def test_delay_limit_holds_the_request(reverse: Mitmdump) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{reverse.port}") as client:
        client.put("/paced")
        started = time.monotonic()
        r = client.put("/paced")
        held = time.monotonic() - started
    assert r.status_code == 200 and held >= 0.2  # the token comes back after 0.5 s
    e = reverse.wait_event(lambda e: at(e, "PUT", "/paced") and e["decision"] == "delay")
    assert e["status"] == 200


def test_dry_run_rule_forwards_and_audits_would_deny(
    reverse: Mitmdump, origin: OriginServer
) -> None:
    r = httpx.delete(f"http://127.0.0.1:{reverse.port}/orders/7")
    assert r.status_code == 200 and ("DELETE", "/orders/7") in origin.requests()
    e = reverse.wait_event(lambda e: at(e, "DELETE", "/orders/7"))
    assert (e["decision"], e["action"], e["enforced"]) == ("allow", "deny", False)
    assert e["rule"] == "web-guard/shadow-delete"


def test_policy_edits_reload_and_a_bad_edit_keeps_the_last_good_set(
    reverse: Mitmdump, workdir: Path
) -> None:
    extra = workdir / "policies" / "zz-reload.yaml"
    url = f"http://127.0.0.1:{reverse.port}/reload/x"

    def wait_status(want: int) -> None:
        deadline = time.monotonic() + 5
        while (got := httpx.get(url).status_code) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        assert got == want

    try:
        wait_status(200)
        extra.write_text(
            "apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: reload}\nspec:\n"
            "  destination: web\n  rules:\n"
            "    - {name: no-reload, http: {paths: ['/reload/**']}, action: deny}\n"
        )
        wait_status(403)
        denied = reverse.wait_event(lambda e: e["path"] == "/reload/x" and e["status"] == 403)
        version = denied["policy_version"]
        assert isinstance(version, int) and version >= 2
        extra.write_text("apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: reload}\nspec: [\n")
        time.sleep(1.5)  # three reload checks
        assert httpx.get(url).status_code == 403  # still the last good set
        time.sleep(0.3)  # the audit flush
        assert reverse.events()[-1]["policy_version"] == version
    finally:
        extra.unlink(missing_ok=True)
    wait_status(200)


def test_inspection_mode_enforces_nothing_but_audits(inspecting: Mitmdump) -> None:
    # This one also audits non-allow decisions only, with full paths.
    with httpx.Client(base_url=f"http://127.0.0.1:{inspecting.port}") as client:
        assert client.get("/plain").status_code == 200
        assert client.get("/admin/panel?id=7").status_code == 200
        assert [client.post("/orders").status_code for _ in range(4)] == [200] * 4
    e = inspecting.wait_event(lambda e: at(e, "GET", "/admin/panel?id=7"))
    assert (e["decision"], e["action"], e["enforced"], e["rule"]) == (
        "allow",
        "deny",
        False,
        "web-guard/no-admin",
    )
    assert e["statement"] == "GET /admin/panel?id=7" and e["status"] == 200
    over = inspecting.wait_event(lambda e: at(e, "POST", "/orders") and e["would"] == "reject")
    assert (over["decision"], over["action"], over["enforced"]) == ("allow", "limit", False)
    assert not [e for e in inspecting.events() if e["path"] == "/plain"]


def test_bad_policies_stop_mitmdump_at_startup(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text("apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: x}\nspec: {rulez: []}\n")
    port = free_port()
    out = subprocess.run(
        [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(port), "-s", "sidecar/mitm_addon.py",
         "--set", f"confdir={workdir / 'conf-bad'}", "--set", "sluice_app=billing",
         "--set", f"sluice_policies={bad}"],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sluice_policies" in out.stdout + out.stderr


# Regular (explicit proxy) mode: HTTPS interception with mitmproxy's CA, HTTP/1.1 and HTTP/2


def _curl(proxy: Mitmdump, url: str, *args: str) -> tuple[str, str, str]:
    """(status, HTTP version, body) of a curl through the proxy, trusting its CA only."""
    out = subprocess.run(
        ["curl", "-s", "--proxy", f"http://127.0.0.1:{proxy.port}", "--cacert", str(proxy.ca),
         "-w", "\n%{http_code} %{http_version}", *args, url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 0, f"curl exit {out.returncode}: {out.stderr}"
    body, tail = out.stdout.rsplit("\n", 1)
    status, version = tail.split()
    return status, version, body


def test_https_interception_enforces_on_the_decrypted_request(
    regular: Mitmdump, nginx_tls: TlsNginx
) -> None:
    base = f"https://localhost:{nginx_tls.port}"
    assert _curl(regular, f"{base}/index.html", "--http1.1") == ("200", "1.1", "external service\n")
    status, _, body = _curl(regular, f"{base}/admin/index.html", "--http1.1")
    assert status == "403" and '"rule":"partner-guard/no-admin"' in body
    e = regular.wait_event(lambda e: at(e, "GET", "/admin/index.html"))
    assert (e["protocol"], e["service"], e["host"]) == (
        "http",
        "partner-api",
        f"localhost:{nginx_tls.port}",
    )
    assert (e["decision"], e["status"]) == ("deny", 403)
    ok = regular.wait_event(lambda e: at(e, "GET", "/index.html"))
    assert (ok["decision"], ok["status"], ok["protocol"]) == ("allow", 200, "http")


def test_http2_through_the_proxy(regular: Mitmdump, nginx_tls: TlsNginx) -> None:
    base = f"https://localhost:{nginx_tls.port}"
    status, version, body = _curl(regular, f"{base}/echo?q=1", "--http2")
    assert (status, version) == ("200", "2")
    assert body == "GET /echo?q=1 HTTP/2.0\n"  # HTTP/2 on both sides of the proxy
    e = regular.wait_event(lambda e: at(e, "GET", "/echo"))
    assert (e["protocol"], e["decision"], e["status"]) == ("http2", "allow", 200)
    status, version, body = _curl(regular, f"{base}/admin/", "--http2")
    assert (status, version) == ("403", "2") and '"policy":"partner-guard"' in body
    e = regular.wait_event(lambda e: at(e, "GET", "/admin/"))
    assert (e["protocol"], e["decision"], e["status"]) == ("http2", "deny", 403)


# WebSocket: the upgrade request is decided


def test_websocket_upgrade_allowed_and_denied(reverse: Mitmdump, origin: OriginServer) -> None:
    ws = WebSocketClient(reverse.port, "/ws/chat")
    try:
        assert ws.status == 101
        ws.send("hello")
        assert ws.receive() == (1, b"echo:hello")
    finally:
        ws.close()
    e = reverse.wait_event(lambda e: at(e, "GET", "/ws/chat"))
    assert (e["protocol"], e["decision"], e["status"]) == ("websocket", "allow", 101)

    denied = WebSocketClient(reverse.port, "/ws/admin")
    try:
        assert denied.status == 403
        assert b'"rule":"web-guard/no-ws-admin"' in denied.body
    finally:
        denied.file.close()
        denied.sock.close()
    assert ("GET", "/ws/admin") not in origin.requests()
    e = reverse.wait_event(lambda e: at(e, "GET", "/ws/admin"))
    assert (e["protocol"], e["decision"], e["status"]) == ("websocket", "deny", 403)


def test_addon_imports_nothing_of_the_control_plane() -> None:
    """mitmproxy's venv has no httpx, fastapi, uvicorn, redis or opentelemetry."""
    python = MITMDUMP.parent / "python"
    code = (
        "import sys, sidecar.mitm_addon; "
        "bad = {'httpx', 'fastapi', 'uvicorn', 'redis', 'opentelemetry', 'uvloop', 'httptools'}; "
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
