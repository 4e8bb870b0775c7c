"""TLS from the MySQL sidecar to its server, and authentication through it, against a
private MariaDB started for this module (`mariadb-install-db`, then `mariadbd` with a CA and
server certificate made here, on a free port; stopped by PID at the end) and the shared
plaintext MariaDB on 127.0.0.1:3306. Real clients: PyMySQL, mysql-connector-python and the
`mariadb` command-line client, which talk plaintext to the sidecar.

(a) Modes require, prefer, verify-ca and verify-full encrypt the server's connection
    (`Ssl_cipher` as the server reports it), a user created REQUIRE SSL logs in, policies
    apply; a wrong CA or name, or a server without TLS, is a clear ERR 1043 to the app.
(b) ed25519 and native passwords through the sidecar, with and without TLS, and the
    renumbered sequence ids on the error paths.
(c) A command sent with the HandshakeResponse is decided, not passed as authentication.
caching_sha2_password (MySQL 8; no such server here): test_mysql_auth_replay.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from sidecar.config import UpstreamTls, load_config
from sidecar.protocols import mysql as my
from tests.sidecar.conftest import GUARD_POLICY, RunningSidecar
from tests.sidecar.pgcluster import Certs, free_port, make_certs
from tests.sidecar.test_mysql_sidecar import Passes

pytestmark = [pytest.mark.mariadb, pytest.mark.slow]

PLUGIN_DIR = Path("/usr/lib/mysql/plugin")
DB = "sluice"
# user -> (password, how it is created)
USERS = {
    "u_native": ("pw-native", "IDENTIFIED BY 'pw-native'"),
    "u_tls": ("pw-tls", "IDENTIFIED BY 'pw-tls' REQUIRE SSL"),
    "u_ed": ("pw-ed", "IDENTIFIED VIA ed25519 USING PASSWORD('pw-ed')"),
    "u_ed_tls": ("pw-ed-tls", "IDENTIFIED VIA ed25519 USING PASSWORD('pw-ed-tls') REQUIRE SSL"),
}
TIMEOUT = 10


class MariaDbServer:
    """A throwaway MariaDB with TLS: its own data directory, certificates and port."""

    def __init__(self) -> None:
        tools = {t: shutil.which(t) for t in ("mariadbd", "mariadb-install-db", "openssl")}
        missing = [t for t, path in tools.items() if path is None]
        if missing:
            raise RuntimeError(f"not installed: {', '.join(missing)}")
        if not (PLUGIN_DIR / "auth_ed25519.so").exists():
            raise RuntimeError(f"no auth_ed25519.so in {PLUGIN_DIR}")
        self.root = Path(tempfile.mkdtemp(prefix="sluice-mariadb-"))
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.certs: Certs = make_certs(self.root / "certs")
            self._start(tools["mariadb-install-db"] or "", tools["mariadbd"] or "")
            self.sql(
                f"CREATE DATABASE {DB}",
                f"CREATE TABLE {DB}.keep (id int primary key)",
                f"INSERT INTO {DB}.keep VALUES (1), (2), (3), (4), (5)",
                *(f"CREATE USER '{u}'@'%' {how}" for u, (_, how) in USERS.items()),
                *(f"GRANT ALL ON {DB}.* TO '{u}'@'%'" for u in USERS),
            )
        except BaseException:
            self.stop()
            raise

    def _start(self, install_db: str, mariadbd: str) -> None:
        data = self.root / "data"
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [
                install_db,
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *as_root,
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        self.port = free_port()
        log = self.root / "error.log"
        self.proc = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={self.root / 'sock'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--ssl-cert={self.certs.server_cert}",
                f"--ssl-key={self.certs.server_key}",
                f"--ssl-ca={self.certs.ca}",
                "--plugin-load-add=auth_ed25519",
                "--innodb-buffer-pool-size=16M",
                f"--log-error={log}",
                f"--pid-file={self.root / 'mariadbd.pid'}",
                *as_root,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.connect().close()
                return
            except pymysql.MySQLError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = log.read_text(errors="replace") if log.exists() else ""
                    raise RuntimeError(f"mariadbd did not start:\n{text[-2000:]}") from None
                time.sleep(0.1)

    def connect(self, **extra: object) -> pymysql.Connection:
        """Directly, as root, in plaintext."""
        return pymysql.connect(
            host="127.0.0.1", port=self.port, user="root", connect_timeout=3, **extra
        )

    def sql(self, *statements: str) -> list[object]:
        out: list[object] = []
        with self.connect(autocommit=True) as c, c.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
                out.append(cur.fetchall())
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to its PID: a clean shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDbServer]:
    try:
        s = MariaDbServer()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no private TLS-enabled MariaDB: {exc}")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def through(
    start_sidecar: Callable[..., RunningSidecar], server: MariaDbServer
) -> Callable[..., RunningSidecar]:
    """A MySQL sidecar in front of the private server, with the given upstream TLS."""

    def start(
        mode: str = "disable",
        ca: Path | None = None,
        server_name: str | None = None,
        upstream: tuple[str, int] | None = None,
    ) -> RunningSidecar:
        tls = UpstreamTls(mode, str(ca) if ca else None, server_name)
        return start_sidecar(
            GUARD_POLICY,
            upstream=upstream or ("127.0.0.1", server.port),
            protocol="mysql",
            tls=tls,
            connect_timeout=5.0,
        )

    return start


def connect(sc: RunningSidecar, user: str, password: str | None = None) -> pymysql.Connection:
    if password is None:
        password = USERS[user][0] if user in USERS else ""
    return pymysql.connect(
        host=sc.host,
        port=sc.port,
        user=user,
        password=password,
        database=DB,
        autocommit=True,
        connect_timeout=TIMEOUT,
        read_timeout=TIMEOUT,
    )


def one(c: pymysql.Connection, sql: str) -> object:
    with c.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        assert row is not None
        return row[-1]


def cli(sc: RunningSidecar, user: str, script: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("mariadb") is None:
        pytest.skip("the mariadb client is not installed")
    argv = ["mariadb", "-h", sc.host, "-P", str(sc.port), "-u", user, f"-p{USERS[user][0]}"]
    return subprocess.run(
        [*argv, "--force", "-N", DB],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- (a) TLS to the server ------------------------------------------------------------------


def test_control_a_require_ssl_user_is_refused_over_a_plaintext_route(through) -> None:
    sc = through("disable")
    with connect(sc, "u_native") as c:
        assert one(c, "SHOW STATUS LIKE 'Ssl_cipher'") == ""  # the server sees plaintext
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(sc, "u_tls")
    assert info.value.args[0] == 1045


@pytest.mark.parametrize(
    ("mode", "ca", "server_name"),
    [
        ("require", None, None),
        ("prefer", None, None),
        ("verify-ca", "ca", None),
        ("verify-full", "ca", "localhost"),
        ("verify-full", "ca", None),  # the upstream's address: the certificate names 127.0.0.1
    ],
)
def test_tls_modes_encrypt_the_servers_connection(
    through,
    server: MariaDbServer,
    mode: str,
    ca: str | None,
    server_name: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The driver passes reads once authenticated (over the upgraded connection), never
    # during the handshake it upgrades, nor during COM_CHANGE_USER's authentication.
    passes = Passes(monkeypatch)
    sc = through(mode, getattr(server.certs, ca) if ca else None, server_name)
    with connect(sc, "u_tls") as c:
        assert one(c, "SHOW STATUS LIKE 'Ssl_cipher'")  # a cipher: the server's side is TLS
        assert one(c, "SELECT CURRENT_USER()") == "u_tls@%"
        assert one(c, "SELECT count(*) FROM keep") == 5
        with pytest.raises(pymysql.err.OperationalError) as info:
            one(c, "DROP TABLE keep")
        assert info.value.args[0] == 1142 and "guard/no-drop" in info.value.args[1]
        assert one(c, "SELECT 'still here'") == "still here"
    assert server.sql(f"SELECT count(*) FROM {DB}.keep") == [((5,),)]
    # Commands through the same sidecar with the other clients.
    cnx = mysql.connector.connect(
        host=sc.host, port=sc.port, user="u_tls", password="pw-tls", database=DB, use_pure=True
    )
    try:
        cur = cnx.cursor(prepared=True)
        cur.execute("SELECT id FROM keep WHERE id = %s", (3,))
        assert cur.fetchall() == [(3,)]
        cnx.cmd_change_user(username="u_native", password="pw-native", database=DB)
        plain = cnx.cursor()
        plain.execute("SELECT CURRENT_USER()")
        assert plain.fetchall() == [("u_native@%",)]
    finally:
        cnx.close()
    passes.check_phases()
    assert "c" in passes.sides() and "s" in passes.sides()


def test_config_file_mysql_route_with_tls(server: MariaDbServer, tmp_path: Path) -> None:
    (tmp_path / "guard.yaml").write_text(GUARD_POLICY)
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "app: billing\n"
        "policies: [guard.yaml]\n"
        "routes:\n"
        "  - service: orders-db\n"
        "    protocol: mysql\n"
        f"    listen: 127.0.0.1:{free_port()}\n"
        f"    upstream: 127.0.0.1:{server.port}\n"
        f"    tls: {{mode: verify-full, ca_file: {server.certs.ca}, server_name: localhost}}\n"
    )
    loaded = load_config(config)
    assert loaded.routes[0].tls == UpstreamTls("verify-full", str(server.certs.ca), "localhost")
    sc = RunningSidecar(loaded, tmp_path / "guard.yaml")
    try:
        with connect(sc, "u_tls") as c:
            assert one(c, "SHOW STATUS LIKE 'Ssl_cipher'")
    finally:
        sc.stop()


def test_mariadb_cli_through_a_tls_route(through, server: MariaDbServer) -> None:
    sc = through("verify-full", server.certs.ca)
    script = "SHOW STATUS LIKE 'Ssl_cipher';\nDROP TABLE keep;\nSELECT 'after';\n"
    done = cli(sc, "u_tls", script)
    lines = done.stdout.splitlines()
    assert lines[0].split("\t")[0] == "Ssl_cipher" and lines[0].split("\t")[1]
    assert lines[1:] == ["after"]
    assert "ERROR 1142 (42000) at line 2: sluice: DROP denied" in done.stderr


@pytest.mark.parametrize(
    ("which_ca", "server_name", "reason"),
    [
        ("other_ca", None, "certificate verify failed: "),  # then OpenSSL's reason
        ("ca", "db.invalid", "certificate verify failed: Hostname mismatch"),
    ],
)
def test_failed_verification_is_a_clear_error(
    through, server: MariaDbServer, which_ca: str, server_name: str | None, reason: str
) -> None:
    sc = through("verify-full", getattr(server.certs, which_ca), server_name)
    started = time.monotonic()
    with pytest.raises(pymysql.err.OperationalError) as info:
        connect(sc, "u_native")
    assert time.monotonic() - started < 5
    code, text = info.value.args
    assert code == my.ER_HANDSHAKE_ERROR
    assert text.startswith(f"sluice: TLS to upstream orders-db at 127.0.0.1:{server.port} failed: ")
    assert reason in text
    done = cli(sc, "u_native", "SELECT 1;\n")
    assert done.returncode != 0
    assert done.stderr.startswith(
        f"ERROR 1043 (08S01): sluice: TLS to upstream orders-db at 127.0.0.1:{server.port} "
        f"failed: {reason}"
    )


def _plaintext_3306() -> None:
    try:
        with pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=3) as c:
            have_ssl = one(c, "SHOW VARIABLES LIKE 'have_ssl'")
    except pymysql.MySQLError as exc:
        pytest.skip(f"MariaDB is not reachable on 127.0.0.1:3306 ({exc})")
    if have_ssl == "YES":
        pytest.skip("the MariaDB on 127.0.0.1:3306 has TLS: no plaintext server to test with")


@pytest.mark.parametrize("mode", ["require", "verify-full"])
def test_tls_required_from_a_plaintext_server_is_a_clear_error(through, mode: str) -> None:
    _plaintext_3306()
    sc = through(mode, upstream=("127.0.0.1", 3306))
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host=sc.host, port=sc.port, user="root", connect_timeout=TIMEOUT)
    text = (
        "sluice: upstream orders-db (127.0.0.1:3306) does not offer TLS, and the route's tls "
        f"mode is {mode}"
    )
    assert info.value.args == (my.ER_HANDSHAKE_ERROR, text)
    if shutil.which("mariadb") is not None:
        done = subprocess.run(
            ["mariadb", "-h", sc.host, "-P", str(sc.port), "-u", "root", "-e", "SELECT 1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.stderr.strip() == f"ERROR 1043 (08S01): {text}"


def test_prefer_falls_back_to_plaintext(through) -> None:
    _plaintext_3306()
    sc = through("prefer", upstream=("127.0.0.1", 3306))
    with pymysql.connect(host=sc.host, port=sc.port, user="root", connect_timeout=TIMEOUT) as c:
        assert one(c, "SHOW STATUS LIKE 'Ssl_cipher'") == ""
        assert one(c, "SELECT 1") == 1


# -- (b) authentication through the sidecar ------------------------------------------------------


@pytest.mark.parametrize("mode", ["disable", "verify-full"])
def test_ed25519_and_native_passwords(through, server: MariaDbServer, mode: str) -> None:
    pytest.importorskip("nacl", reason="PyMySQL needs PyNaCl for ed25519 (the dev extras)")
    sc = through(mode, server.certs.ca)
    users = ["u_native", "u_ed"] + (["u_tls", "u_ed_tls"] if mode != "disable" else [])
    for user in users:
        with connect(sc, user) as c:
            assert one(c, "SELECT CURRENT_USER()") == f"{user}@%"
            assert bool(one(c, "SHOW STATUS LIKE 'Ssl_cipher'")) == (mode != "disable")
        with pytest.raises(pymysql.err.OperationalError) as info:
            connect(sc, user, "wrong")
        assert info.value.args[0] == 1045 and f"'{user}'" in info.value.args[1]
    done = cli(sc, "u_ed", "SELECT CURRENT_USER();\nDROP TABLE keep;\n")
    assert done.stdout.split() == ["u_ed@%"]
    assert "ERROR 1142 (42000)" in done.stderr
    assert server.sql(f"SELECT count(*) FROM {DB}.keep") == [((5,),)]


# -- (c) a command sent before authentication ended -------------------------------------------


def _packet(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise EOFError("closed")
        head += chunk
    length, seq = my.packet_header(head, 0)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise EOFError("closed")
        body += chunk
    return seq, body


@pytest.mark.parametrize("mode", ["disable", "require"])
def test_command_pipelined_after_the_handshake_is_decided(
    through, server: MariaDbServer, mode: str
) -> None:
    """The HandshakeResponse and a DROP in one write: the DROP waits for the server's OK and
    is denied; it never reaches the server as if it were authentication data."""
    sc = through(mode)
    caps = (
        my.CLIENT_LONG_PASSWORD
        | my.CLIENT_CONNECT_WITH_DB
        | my.CLIENT_PROTOCOL_41
        | my.CLIENT_SECURE_CONNECTION
        | my.CLIENT_PLUGIN_AUTH
    )
    hello = (
        struct.pack("<IIB23s", caps, 1 << 24, 45, b"")
        + b"root\0\0"  # no password: an empty auth response
        + DB.encode()
        + b"\0mysql_native_password\0"
    )
    with socket.create_connection((sc.host, sc.port), TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        assert _packet(sock)[1][0] == 10  # the greeting
        sock.sendall(my.packets(hello, 1) + my.packets(b"\x03DROP TABLE keep", 0))
        assert _packet(sock) == (2, b"\x00\x00\x00\x02\x00\x00\x00")  # authenticated
        seq, err = _packet(sock)
        assert seq == 1 and my.err_fields(err).code == my.ER_TABLEACCESS_DENIED
        sock.sendall(my.packets(b"\x01", 0))  # COM_QUIT
        with contextlib.suppress(OSError):
            assert sock.recv(1) == b""
    assert server.sql(f"SELECT count(*) FROM {DB}.keep") == [((5,),)]
