"""`sluice run` end to end: unmodified programs in their own namespace, under policy.

One `sluice up` (control API, catalog, meshdns on a free port) with orders-db registered
at the real PostgreSQL, and the programs as they are: psql and a psycopg script connect to
`orders-db.service.consul` (resolved through the namespace's DNS relay and meshdns), get
42501 for a denied DROP and go on, 53400 past a limit, and the audit trail names the app;
an echo server that is no mesh service is passed (or reset with `--unknown deny`) and
audited; curl through an HTTP route once `http` is a sidecar protocol. Then the process
contract: exit code, stdin/stdout, SIGTERM/SIGINT forwarded, the namespace gone after
exit, a stale one (kill -9) cleaned by the next start, and a clear message without root.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import signal
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import consul
import psycopg
import pytest

from sidecar import netns
from sidecar.config import PROTOCOLS
from tests.mesh.conftest import ControlPlane
from tests.sidecar.conftest import PG_HOST, PG_PORT, PG_USER
from tests.sidecar.test_transparent import netns_problem

pytestmark = [pytest.mark.slow]

SLUICE = str(Path(sys.executable).with_name("sluice"))
POLICIES = {
    "orders-db.yaml": textwrap.dedent(
        """\
        apiVersion: sluice/v1
        kind: Policy
        metadata: {name: orders-guard}
        spec:
          destination: orders-db
          rules:
            - {name: no-drop, sql: {verbs: [DROP]}, action: deny}
            - name: few-inserts
              sql: {verbs: [INSERT], tables: [events]}
              action: limit
              limit: {rate: 2, per: 1m, burst: 2, scope: source-instance}
        """
    ),
    "web.yaml": textwrap.dedent(
        """\
        apiVersion: sluice/v1
        kind: Policy
        metadata: {name: web-guard}
        spec:
          destination: web
          rules:
            - name: no-admin-writes
              http: {methods: [POST], paths: ["/admin/**"]}
              action: deny
        """
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _needs_namespaces() -> None:
    problem = netns_problem()
    if problem:
        pytest.skip(f"sluice run {problem}")


@dataclass
class Mesh:
    cp: ControlPlane
    dns: int
    token: str
    db: str
    echo: int
    web: int

    def run(self, instance: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        argv = [*self.flags(instance), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)

    def flags(self, instance: str, *routes: str) -> list[str]:
        return [
            SLUICE,
            "run",
            "--app",
            "billing",
            "--instance",
            instance,
            "--control",
            self.cp.url,
            "--token",
            self.token,
            "--state-dir",
            str(self.cp.data_dir.parent / f"state-{instance}"),
            "--dns",
            f"127.0.0.1:{self.dns}",
            *(routes or ("--service", "orders-db")),
        ]

    def events(self, instance: str, want: Callable[[list[dict[str, Any]]], bool]) -> list[Any]:
        deadline = time.monotonic() + 10
        with self.cp.client() as c:
            while True:
                r = c.get("/v1/audit/events", params={"instance": instance, "limit": 1000})
                assert r.status_code == 200, r.text
                events: list[dict[str, Any]] = r.json()["events"]
                if want(events) or time.monotonic() > deadline:
                    return events
                time.sleep(0.1)


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())  # until the client's EOF


class _Web(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(b"hello from web\n")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(b"posted\n")

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def mesh(scratch_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=scratch_db, autocommit=True
    ) as c:
        c.execute("CREATE TABLE events (n int)")
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    web = ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    for server in (echo, web):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    cp = ControlPlane(tmp_path_factory.mktemp("run") / "cp", "--dns-listen", "127.0.0.1:0")
    cp.start()
    try:
        deadline = time.monotonic() + 10
        while not (m := re.search(r"DNS on 127\.0\.0\.1:(\d+)", cp.output())):
            assert time.monotonic() < deadline, cp.output()
            time.sleep(0.05)
        catalog = consul.Consul(
            host="127.0.0.1", port=int(cp.url.rsplit(":", 1)[1]), token=cp.admin_token
        )
        catalog.agent.service.register(
            "orders-db", service_id="orders-db-1", address=PG_HOST, port=PG_PORT
        )
        catalog.agent.service.register(
            "web", service_id="web-1", address="127.0.0.1", port=web.server_address[1]
        )
        with cp.client() as c:
            r = c.post("/v1/policies", json={"files": POLICIES, "comment": "sluice run"})
            assert r.status_code == 201, r.text
            r = c.post("/v1/tokens", json={"role": "sidecar", "name": "billing"})
            assert r.status_code == 201, r.text
            token = r.json()["token"]
        yield Mesh(
            cp, int(m.group(1)), token, scratch_db, echo.server_address[1], web.server_address[1]
        )
    finally:
        cp.stop()
        for server in (echo, web):
            server.shutdown()
            server.server_close()


def namespace_gone(pid: int) -> bool:
    name = f"sluice-{pid}"
    link = subprocess.run(["ip", "link", "show", f"sl{pid}"], capture_output=True)
    return (
        not (netns.NETNS_DIR / name).exists()
        and not (netns.NETNS_ETC / name).exists()
        and link.returncode != 0
    )


@pytest.mark.postgres
def test_psql_by_service_name_denied_drop_and_the_session_goes_on(mesh: Mesh) -> None:
    if shutil.which("psql") is None:
        pytest.skip("psql not installed (Debian: postgresql-client)")
    script = "\\set VERBOSITY verbose\nSELECT 'before';\nDROP TABLE events;\nSELECT 'after';\n"
    psql = ["psql", "-X", "-h", "orders-db.service.consul", "-U", PG_USER, "-d", mesh.db]
    done = mesh.run("psql-1", "--", *psql, input=script)
    assert "before" in done.stdout and "after" in done.stdout, done.stderr
    assert "ERROR:  42501: sluice: DROP denied by policy orders-guard" in done.stderr
    events = mesh.events("psql-1", lambda ev: any(e["decision"] == "deny" for e in ev))
    denied = [e for e in events if e["decision"] == "deny"]
    assert [(e["app"], e["service"], e["error"]) for e in denied] == [
        ("billing", "orders-db", "42501")
    ]
    assert {e["app"] for e in events} == {"billing"}


PSYCOPG_SCRIPT = textwrap.dedent(
    """\
    import json, socket, sys
    import psycopg
    db, echo = sys.argv[1], int(sys.argv[2])
    out = {"inserts": []}
    with psycopg.connect(host="orders-db.service.consul", user="postgres", dbname=db,
                         autocommit=True) as c:
        for n in range(4):
            try:
                c.execute("INSERT INTO events (n) VALUES (%s)", (n,))
                out["inserts"].append("ok")
            except psycopg.Error as exc:
                out["inserts"].append(exc.sqlstate)
        try:
            c.execute("DROP TABLE events")
        except psycopg.Error as exc:
            out["drop"] = exc.sqlstate
        out["count"] = c.execute("SELECT count(*) FROM events").fetchone()[0]
    try:
        with socket.create_connection(("127.0.0.1", echo), timeout=5) as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            out["echo"] = s.recv(100).decode()
    except OSError as exc:
        out["echo"] = type(exc).__name__
    print(json.dumps(out))
    """
)


@pytest.mark.postgres
def test_psycopg_script_limit_deny_and_an_external_destination(mesh: Mesh) -> None:
    done = mesh.run("script-1", "--", sys.executable, "-c", PSYCOPG_SCRIPT, mesh.db, str(mesh.echo))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "inserts": ["ok", "ok", "53400", "53400"],
        "drop": "42501",
        "count": 2,
        "echo": "hello",
    }
    external = f"external:127.0.0.1:{mesh.echo}"
    events = mesh.events("script-1", lambda ev: any(e["service"] == external for e in ev))
    decisions = sorted((e["service"], e["decision"], e["error"]) for e in events)
    assert decisions == sorted(
        [("orders-db", "allow", None)] * 3  # 2 INSERTs and the SELECT
        + [("orders-db", "reject", "53400")] * 2
        + [("orders-db", "deny", "42501"), (external, "allow", None)]
    )
    tcp = next(e for e in events if e["service"] == external)
    assert (tcp["app"], tcp["protocol"], tcp["bytes_in"], tcp["bytes_out"]) == (
        "billing",
        "tcp",
        5,
        5,
    )


@pytest.mark.postgres
def test_unknown_deny_resets_and_audits(mesh: Mesh, tmp_path: Path) -> None:
    policy = tmp_path / "orders.yaml"
    policy.write_text(POLICIES["orders-db.yaml"])
    audit = tmp_path / "audit.jsonl"
    argv = [
        SLUICE,
        "run",
        "--app",
        "reporting",
        "--policies",
        str(policy),
        "--service",
        f"orders-db={PG_HOST}:{PG_PORT}",
        "--unknown",
        "deny",
        "--audit-log",
        str(audit),
        "--dns",
        f"127.0.0.1:{mesh.dns}",
        "--",
        sys.executable,
        "-c",
        PSYCOPG_SCRIPT,
        mesh.db,
        str(mesh.echo),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["echo"] in ("ConnectionResetError", "") and out["drop"] == "42501"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    tcp = [e for e in events if e["protocol"] == "tcp"]
    assert [(e["app"], e["service"], e["decision"]) for e in tcp] == [
        ("reporting", f"external:127.0.0.1:{mesh.echo}", "deny")
    ]


def test_curl_through_an_http_route(mesh: Mesh) -> None:
    if "http" not in PROTOCOLS:
        pytest.skip("the HTTP sidecar is not built yet ('http' not in sidecar.config.PROTOCOLS)")
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    url = f"http://web.service.consul:{mesh.web}"
    script = (
        f"curl -sS -w ' %{{http_code}}\\n' {url}/hello; "
        f"curl -sS -o /dev/null -w '%{{http_code}}\\n' -X POST -d x {url}/admin/users"
    )
    argv = [*mesh.flags("curl-1", "--service", "web:http"), "--", "sh", "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["hello from web", " 200", "403"], done.stderr
    events = mesh.events("curl-1", lambda ev: len(ev) >= 2)
    assert sorted((e["service"], e["decision"]) for e in events) == [
        ("web", "allow"),
        ("web", "deny"),
    ]


def test_exit_code_stdin_stdout_and_the_namespace_removed() -> None:
    proc = subprocess.Popen(
        [SLUICE, "run", "--app", "x", "--", "sh", "-c", "cat; exit 7"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate("line one\nline two\n", timeout=60)
    assert (proc.returncode, out) == (7, "line one\nline two\n"), err
    assert namespace_gone(proc.pid)
    missing = subprocess.run(
        [SLUICE, "run", "--app", "x", "--", "no-such-command-here"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 127
    assert "no-such-command-here: command not found" in missing.stderr


def read_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output from the app"
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded(sig: signal.Signals) -> None:
    app = f'trap "echo got-{sig.name}; exit 3" {sig.name[3:]}; echo ready; while :; do sleep 0.05; done'
    # No terminal on its stdio: a SIGINT it gets did not reach the app from a terminal too.
    proc = subprocess.Popen(
        [SLUICE, "run", "--app", "x", "--", "sh", "-c", app],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert read_line(proc) == "ready"
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=30)
    assert (proc.returncode, rest.strip()) == (3, f"got-{sig.name}"), err
    assert namespace_gone(proc.pid)


def test_a_namespace_left_by_kill_9_is_removed_on_the_next_start() -> None:
    argv = [SLUICE, "run", "--app", "x", "--", "sh", "-c", "echo $$; exec sleep 60"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    app = int(read_line(proc))
    proc.kill()
    proc.communicate(timeout=10)
    assert not namespace_gone(proc.pid)  # left behind
    deadline = time.monotonic() + 10  # the app got SIGTERM when sluice run died
    while Path(f"/proc/{app}").exists() and Path(f"/proc/{app}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the app outlived its sluice run"
        time.sleep(0.05)
    done = subprocess.run(
        [SLUICE, "run", "--app", "x", "--", "true"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"removed sluice-{proc.pid}" in done.stderr
    assert namespace_gone(proc.pid)


@pytest.mark.parametrize(
    "drop",
    [
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"],
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"],
    ],
    ids=["no-capabilities", "user-nobody"],
)
def test_without_capabilities_a_clear_message(drop: list[str]) -> None:
    done = subprocess.run(
        [*drop, SLUICE, "run", "--app", "x", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 125, done.stderr
    assert "missing CAP_NET_ADMIN and CAP_SYS_ADMIN" in done.stderr
    assert "DNS mode" in done.stderr and "explicit mode" in done.stderr
