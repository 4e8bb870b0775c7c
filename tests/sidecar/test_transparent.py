"""The transparent listener (sidecar/transparent.py) and the namespace it serves.

Without root: how an original destination is mapped to a route (catalog instances, fixed
upstreams, listen addresses, localhost), the `--service` syntax, the netfilter rules.

With root (skipped with a message otherwise): the pieces of `sluice run` in this process
on a real namespace (sidecar/netns.py, sidecar/netfilter.py, the listener, the DNS
relay's sockets), an unmodified client inside it: psycopg to 127.0.0.1:5432 reaches the
real PostgreSQL through the sidecar (a denial is 42501 and the session goes on); a TCP
echo server that is no mesh service is passed through (half-close included, IPv4 and
IPv6) or reset with `deny`, audited either way; a refused destination resets the app's
connection; UDP other than DNS cannot leave.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import uvloop

from mesh.cli import _parser
from mesh.run import _make_sockets
from mesh.run_cmd import build_config, parse_service
from sidecar import netfilter, netns
from sidecar.audit import MemorySink
from sidecar.config import AuditConfig, Route, ServiceUpstream, SidecarConfig
from sidecar.server import Sidecar
from sidecar.transparent import TransparentListener, addresses
from sidecar.upstreams import Instance
from tests.sidecar.conftest import PG_HOST, PG_PORT, pg_available

POLICY = textwrap.dedent(
    """\
    apiVersion: sluice/v1
    kind: Policy
    metadata: {name: guard}
    spec:
      destination: orders-db
      rules:
        - {name: no-drop, sql: {verbs: [DROP]}, action: deny}
    """
)


def netns_problem() -> str | None:
    """Why namespace tests cannot run here, or None."""
    missing = netns.missing_capabilities()
    if missing:
        return f"needs root ({', '.join(missing)} missing)"
    tools = netns.missing_tools()
    if tools:
        return f"needs {' and '.join(tools)} (apt-get install iproute2 iptables)"
    return None


def config(tmp_path: Path, *routes: Route) -> SidecarConfig:
    policy = tmp_path / "guard.yaml"
    policy.write_text(POLICY)
    return SidecarConfig("billing", "billing-1", (str(policy),), routes, AuditConfig(None, "all"))


# -- without root ------------------------------------------------------------------------


def test_route_for_maps_catalog_upstream_and_listen_addresses(tmp_path: Path) -> None:
    db = Route(
        "orders-db",
        "postgres",
        ("127.0.0.1", 0),
        ("orders-db.service", 0),
        upstream_service=ServiceUpstream("orders-db"),
    )
    ledger = Route("ledger", "mysql", ("127.0.0.1", 13306), ("10.1.2.3", 3306))
    local = Route("cache", "postgres", ("127.0.0.1", 0), ("localhost", 6000))
    sidecar = Sidecar(config(tmp_path, db, ledger, local), sink=MemorySink(), listen=False)
    picker = sidecar.routes[0].picker
    assert picker is not None
    picker.update((Instance("a", "127.0.0.1", 5432), Instance("b", "fd00::0:7", 5433)))
    listener = TransparentListener(sidecar, [], "deny")
    asyncio.run(listener.start())
    by = {rt.route.service: rt for rt in sidecar.routes}
    assert listener.route_for("127.0.0.1", 5432) is by["orders-db"]
    assert listener.route_for("fd00::7", 5433) is by["orders-db"]
    assert listener.route_for("10.1.2.3", 3306) is by["ledger"]
    assert listener.route_for("127.0.0.1", 13306) is by["ledger"]  # its explicit-mode address
    assert listener.route_for("::1", 6000) is by["cache"]
    assert listener.route_for("127.0.0.1", 6000) is by["cache"]
    assert listener.route_for("127.0.0.1", 5433) is None
    assert listener.route_for("10.1.2.3", 5432) is None
    picker.update(())  # gone from the catalog: no longer a mesh address
    assert listener.route_for("127.0.0.1", 5432) is None
    with pytest.raises(ValueError, match="pass or deny"):
        TransparentListener(sidecar, [], "drop")


def test_addresses() -> None:
    assert addresses("127.0.0.1") == ("127.0.0.1",)
    assert addresses("[::1]") == ("::1",)
    assert addresses("LOCALHOST") == ("127.0.0.1", "::1")
    assert addresses("db.internal") == ()


@pytest.mark.parametrize(
    ("spec", "service", "protocol", "upstream", "catalog"),
    [
        ("orders-db", "orders-db", "postgres", ("orders-db.service", 0), "orders-db"),
        ("ledger:mysql", "ledger", "mysql", ("ledger.service", 0), "ledger"),
        ("db=127.0.0.1:5432", "db", "postgres", ("127.0.0.1", 5432), None),
        (
            "db:postgres=primary.orders-db.service",
            "db",
            "postgres",
            ("orders-db.service", 0),
            "orders-db",
        ),
    ],
)
def test_service_flag(
    spec: str, service: str, protocol: str, upstream: tuple[str, int], catalog: str | None
) -> None:
    route = parse_service(spec)
    assert (route.service, route.protocol, route.upstream) == (service, protocol, upstream)
    assert (route.upstream_service.name if route.upstream_service else None) == catalog


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("orders db", "expected NAME"),
        ("db:ftp", "protocol must be one of"),
        ("db=", "empty upstream"),
        ("db=nowhere", 'expected "HOST:PORT" or "NAME.service"'),
    ],
)
def test_service_flag_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_service(spec)


def test_rules_redirect_tcp_and_refuse_other_egress() -> None:
    v4 = netfilter.rules_v4(15001)
    assert "-A OUTPUT -p tcp -d 127.0.0.1/32 --dport 53 -j RETURN" in v4
    assert "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001" in v4
    assert v4.index("RETURN") < v4.index("REDIRECT")  # DNS over TCP reaches the relay
    assert v4.rstrip().endswith("-j REJECT --reject-with icmp-admin-prohibited\nCOMMIT")
    assert "--to-ports 15001" in netfilter.rules_v6(15001)


def test_interception_mode_examples_in_the_docs_parse() -> None:
    """docs/operations.md's `sluice` commands for the three modes use flags that exist."""
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = text.split("## Interception modes", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M):
        commands += [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c]
    assert [c[1] for c in commands] == ["run", "run", "sidecar", "dns"]
    parser = _parser()
    for argv in commands:
        assert argv[0] == "sluice"
        args = parser.parse_args(argv[1:])
        if argv[1] == "run":
            assert args.command[:1] == ["--"] and args.command[1:]
            if not args.config:  # a file would have to exist
                assert build_config(args).app == args.app


# -- with root: a real namespace ---------------------------------------------------------

CLIENT = textwrap.dedent(
    """\
    import json, socket, sys
    import psycopg
    echo, dead = int(sys.argv[1]), int(sys.argv[2])
    out = {}
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                         autocommit=True) as c:
        out["select"] = c.execute("SELECT 1").fetchone()[0]
        try:
            c.execute("DROP TABLE sluice_no_such_table")
        except psycopg.Error as exc:
            out["drop"] = exc.sqlstate
        out["after"] = c.execute("SELECT 2").fetchone()[0]
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family)
        s.settimeout(5)
        try:
            s.connect((host, echo))
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)  # half-close: the reply must still come
            data = b""
            while chunk := s.recv(100):
                data += chunk
            out[host] = data.decode()
        except OSError as exc:
            out[host] = type(exc).__name__
        s.close()
    try:  # nothing listens there: the sidecar's connect is refused, the app's is reset
        socket.create_connection(("127.0.0.1", dead), timeout=5).recv(1)
        out["dead"] = "connected"
    except OSError as exc:
        out["dead"] = type(exc).__name__
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"x", ("192.0.2.1", 9999))
        out["udp"] = "sent"
    except OSError as exc:
        out["udp"] = type(exc).__name__
    print(json.dumps(out))
    """
)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens here


async def echo_server() -> tuple[list[asyncio.AbstractServer], int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())  # until the client's EOF
        await writer.drain()
        writer.close()

    v4 = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = v4.sockets[0].getsockname()[1]
    v6 = await asyncio.start_server(echo, "::1", port)
    return [v4, v6], port


async def run_inside(ns: netns.Namespace, *argv: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns.name, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out)
    return result


@pytest.mark.postgres
def test_namespace_listener_and_rules_in_process(tmp_path: Path) -> None:
    problem = netns_problem() or pg_available()
    if problem:
        pytest.skip(problem)
    route = Route("orders-db", "postgres", ("127.0.0.1", 0), (PG_HOST, PG_PORT))
    sink = MemorySink()
    sidecar = Sidecar(config(tmp_path, route), sink=sink, listen=False)
    with netns.locked():
        ns = netns.create(os.getpid(), "nameserver 127.0.0.1\n")
    try:
        assert Path(ns.path).exists() and (Path("/etc/netns") / ns.name / "resolv.conf").is_file()

        ports: list[int] = []

        async def scenario() -> None:
            await sidecar.start()
            v4, v6, udp, tcp = netns.in_namespace(ns.path, _make_sockets)
            udp.close()
            tcp.close()
            assert v6 is not None, "IPv6 on loopback expected on this machine"
            assert netfilter.install(ns.name, v4.getsockname()[1], v6=True)
            listener = TransparentListener(sidecar, [v4, v6], "pass")
            await listener.start()
            servers, echo = await echo_server()
            ports.append(echo)
            try:
                client = ("-c", CLIENT, str(echo), str(dead_port()))
                passed = await run_inside(ns, sys.executable, *client)
                assert passed == {
                    "select": 1,
                    "drop": "42501",
                    "after": 2,
                    "127.0.0.1": "ping",
                    "::1": "ping",
                    "dead": "ConnectionResetError",
                    "udp": "PermissionError",
                }
                listener.unknown = "deny"
                denied = await run_inside(ns, sys.executable, *client)
                assert denied["127.0.0.1"] in ("ConnectionResetError", "")
                assert denied["::1"] in ("ConnectionResetError", "")
                assert denied["drop"] == "42501"
                assert listener.counts == {"mesh": 2, "pass": 3, "deny": 3}
            finally:
                for s in servers:
                    s.close()
                await listener.close()
                await sidecar.stop()

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(scenario())
    finally:
        with netns.locked():
            netns.remove(ns)
    assert not Path(ns.path).exists() and not (Path("/etc/netns") / ns.name).exists()
    assert subprocess.run(["ip", "link", "show", ns.host_if], capture_output=True).returncode

    by_service: dict[str, list[tuple[str, str | None, int | None, int | None]]] = {}
    for e in sink.events:
        by_service.setdefault(e.service, []).append((e.decision, e.error, e.bytes_in, e.bytes_out))
    assert sorted(by_service["orders-db"]) == sorted(
        [("allow", None, None, None)] * 4 + [("deny", "42501", None, None)] * 2
    )
    external = {k: v for k, v in by_service.items() if k.startswith("external:")}
    for where in (f"127.0.0.1:{ports[0]}", f"[::1]:{ports[0]}"):  # the echo server, twice
        events = external.pop(f"external:{where}")
        assert sorted(events, key=str) == [("allow", None, 4, 4), ("deny", None, 0, 0)]
    dead = sorted((e for events in external.values() for e in events), key=str)
    assert dead == [  # a dead port in each run: passed (and refused), then denied
        ("allow", "connect: Connection refused", 0, 0),
        ("deny", None, 0, 0),
    ]
    tcp = [e for e in sink.events if e.protocol == "tcp"]
    assert {e.app for e in tcp} == {"billing"}
    assert all(e.statement.startswith("CONNECT ") for e in tcp)


def test_missing_tools_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert netns.missing_tools() == ["ip", "iptables-restore"]
