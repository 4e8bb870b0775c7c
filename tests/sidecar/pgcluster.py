"""A private, throwaway PostgreSQL cluster for tests that need what the shared server on
127.0.0.1:5432 does not offer (password authentication, TLS): initdb into a temporary
directory, a self-signed CA and server certificate made with the `openssl` CLI, our own
pg_hba.conf, and `pg_ctl` to start and stop it. Everything lives under one directory that
`stop()` removes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The server refuses to run as root; when the tests do, the cluster runs as this OS user.
RUN_AS = "postgres"
SUPERUSER = "postgres"
# Bounds on every external command: the whole startup must stay within about ten seconds.
COMMAND_TIMEOUT = 30.0
START_TIMEOUT = 10

# Login roles and their pg_hba.conf method; the password of each is PASSWORDS[role].
ROLES = {
    "u_scram": "scram-sha-256",
    "u_md5": "md5",
    "u_pw": "password",
    "u_tls_only": "scram-sha-256",  # only on `hostssl` lines
}
PASSWORDS = {role: f"pw-{role}-secret" for role in ROLES}

_HBA = """\
# TYPE   DATABASE USER        ADDRESS       METHOD
local    all      all                       trust
hostssl  all      u_tls_only  127.0.0.1/32  scram-sha-256
host     all      u_scram     127.0.0.1/32  scram-sha-256
host     all      u_md5       127.0.0.1/32  md5
host     all      u_pw        127.0.0.1/32  password
host     all      postgres    127.0.0.1/32  trust
"""


class ClusterUnavailable(Exception):
    """The binaries or the OS user needed for a private cluster are missing."""


@dataclass(frozen=True, slots=True)
class Certs:
    ca: Path  # the CA that signed the server certificate
    other_ca: Path  # an unrelated self-signed CA: verifying with it must fail
    server_cert: Path
    server_key: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, **kwargs
    )  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc  # type: ignore[no-any-return]


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate it signs (localhost and 127.0.0.1), and a stranger CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _run(
            [
                "openssl",
                "req",
                "-x509",
                *ec,
                "-days",
                "2",
                "-subj",
                f"/CN=sluice test {name}",
                "-keyout",
                str(directory / f"{name}.key"),
                "-out",
                str(directory / f"{name}.crt"),
            ]
        )
    key, csr, crt = (directory / f"server.{ext}" for ext in ("key", "csr", "crt"))
    _run(
        [
            "openssl",
            "req",
            "-new",
            *ec,
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ]
    )
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-CA",
            str(directory / "ca.crt"),
            "-CAkey",
            str(directory / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(crt),
        ]
    )
    key.chmod(0o600)
    return Certs(directory / "ca.crt", directory / "other-ca.crt", crt, key)


class PgCluster:
    """initdb + certificates + pg_ctl start; `stop()` stops it and removes its directory."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).exists():
                raise ClusterUnavailable(f"{PG_BIN / tool} is not installed")
        if shutil.which("openssl") is None:
            raise ClusterUnavailable("the openssl CLI is not installed")
        self.prefix: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                self.owner = pwd.getpwnam(RUN_AS)
            except KeyError:
                raise ClusterUnavailable(f"running as root and no OS user {RUN_AS!r}") from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ClusterUnavailable("running as root and runuser is not installed")
            self.prefix = [runuser, "-u", RUN_AS, "--"]
        # Not pytest's tmp_path: its parents are private to root, and the server's user
        # must reach its data directory.
        self.root = Path(tempfile.mkdtemp(prefix="sluice-pgcluster-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False
        try:
            self.certs = make_certs(self.root / "certs")
            self._chown(self.root)
            self._initdb()
            self._start()
            self._create_roles()
        except BaseException:
            self.stop()
            raise

    def _chown(self, path: Path) -> None:
        if self.owner is None:
            return
        for p in [path, *path.rglob("*")]:
            os.chown(p, self.owner.pw_uid, self.owner.pw_gid)

    def _initdb(self) -> None:
        _run(
            [
                *self.prefix,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        (self.data / "pg_hba.conf").write_text(_HBA)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# sluice test cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                "ssl = on\n"
                f"ssl_cert_file = '{self.certs.server_cert}'\n"
                f"ssl_key_file = '{self.certs.server_key}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 30\n"
                "shared_buffers = 16MB\n"
            )
        self._chown(self.data)

    def _start(self) -> None:
        # The port is free when we pick it, but something may take it before the server
        # binds: try a few.
        for _attempt in range(3):
            self.port = free_port()
            proc = subprocess.run(
                [
                    *self.prefix,
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    f"-p {self.port} -k {self.root}",
                    "-w",
                    "-t",
                    str(START_TIMEOUT),
                    "start",
                ],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT + 5,
                check=False,
            )
            if proc.returncode == 0:
                self.running = True
                return
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        raise RuntimeError(f"pg_ctl start failed:\n{proc.stderr}\n{log}")

    def _create_roles(self) -> None:
        sql = []
        for role, method in ROLES.items():
            # md5 in pg_hba.conf uses SCRAM when the stored password is a SCRAM verifier;
            # store an md5 hash for the md5 role so that md5 is what runs.
            encryption = "md5" if method == "md5" else "scram-sha-256"
            sql.append(f"SET password_encryption = '{encryption}';")
            sql.append(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORDS[role]}';")
        self.psql("\n".join(sql))

    def psql(self, script: str) -> str:
        """Run SQL as the superuser over the cluster's Unix socket."""
        proc = _run(
            [
                *self.prefix,
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
            ],
            input=script,
        )
        return proc.stdout

    def stop(self) -> None:
        if self.running:
            self.running = False
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    [
                        *self.prefix,
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(self.data),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        "10",
                        "stop",
                    ],
                    capture_output=True,
                    timeout=15,
                    check=False,
                )
        shutil.rmtree(self.root, ignore_errors=True)
