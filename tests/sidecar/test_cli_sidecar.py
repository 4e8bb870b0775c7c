"""`sluice sidecar` as people run it: the README's example, and a config file with routes."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from tests.conftest import REPO

pytestmark = pytest.mark.postgres
SLUICE = str(Path(sys.executable).with_name("sluice"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the sidecar did not listen within 15 s")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return out


def readme_blocks() -> tuple[list[str], str, str]:
    """The sidecar command, the psql command and its expected output, from the README."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Put a sidecar in front of PostgreSQL", 1)[1]
    start = re.search(r"```sh\n(.*?)```", section, re.S)
    console = re.search(r"```console\n\$ (.*?)\n(.*?)```", section, re.S)
    assert start and console
    return shlex.split(start.group(1).replace("\\\n", " ")), console.group(1), console.group(2)


def test_readme_sidecar_example_runs_as_written(scratch_db: str) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    argv, command, expected = readme_blocks()
    port = free_port()
    argv = [
        SLUICE if a == ".venv/bin/sluice" else a.replace("127.0.0.1:6432", f"127.0.0.1:{port}")
        for a in argv
    ]
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_listening(proc, port)
        run = [*shlex.split(command.replace("-p 6432", f"-p {port}")), "-d", scratch_db, "-X"]
        done = subprocess.run(run, capture_output=True, text=True, timeout=30, check=False)
        assert done.stderr == expected
    finally:
        output = stop(proc)
    assert f"listening on 127.0.0.1:{port} -> upstream 127.0.0.1:5432 (postgres)" in output


def test_config_file_with_two_routes(tmp_path: Path, scratch_db: str) -> None:
    a, b = free_port(), free_port()
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: sluice/v1
            kind: Policy
            metadata: {name: reporting-read-only}
            spec:
              destination: reports-db
              default: deny
              rules:
                - {name: reads, sql: {verbs: [SELECT]}, action: allow}
            """
        )
    )
    (tmp_path / "sidecar.yaml").write_text(
        textwrap.dedent(
            f"""\
            app: reporting
            policies: [policies]
            routes:
              - {{service: orders-db, listen: "127.0.0.1:{a}", upstream: "127.0.0.1:5432"}}
              - {{service: reports-db, listen: "127.0.0.1:{b}", upstream: "127.0.0.1:5432"}}
            audit: {{path: audit.jsonl, record: non-allow}}
            """
        )
    )
    proc = subprocess.Popen(
        [SLUICE, "sidecar", "-c", str(tmp_path / "sidecar.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_listening(proc, a)
        wait_listening(proc, b)
        with psycopg.connect(
            host="127.0.0.1", port=a, user="postgres", dbname=scratch_db, autocommit=True
        ) as c:
            c.execute("CREATE TEMP TABLE t (x int)")  # orders-db: no policy
        with psycopg.connect(
            host="127.0.0.1", port=b, user="postgres", dbname=scratch_db, autocommit=True
        ) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(errors.InsufficientPrivilege, match="default deny"):
                c.execute("CREATE TEMP TABLE t (x int)")
    finally:
        stop(proc)
    audit = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert (
        len(audit) == 1 and '"decision":"deny"' in audit[0] and '"service":"reports-db"' in audit[0]
    )


def test_invalid_invocations_say_what_is_wrong(tmp_path: Path) -> None:
    missing = subprocess.run(
        [SLUICE, "sidecar", "--app", "x"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (
        missing.returncode == 2
        and "missing --service, --listen, --upstream, --policies" in missing.stderr
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "app: x\npolicies: [p]\nroutes:\n  - {service: s, listen: 'nowhere', upstream: '127.0.0.1:5432'}\n"
    )
    invalid = subprocess.run(
        [SLUICE, "sidecar", "-c", str(bad)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (
        invalid.returncode == 1
        and f"{bad}:4:" in invalid.stderr
        and 'expected "HOST:PORT"' in invalid.stderr
    )
    policy = tmp_path / "broken.yaml"
    policy.write_text("kind: Policy\n")
    rejected = subprocess.run(
        [
            SLUICE,
            "sidecar",
            "--app",
            "a",
            "--service",
            "s",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--upstream",
            "127.0.0.1:5432",
            "--policies",
            str(policy),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (
        rejected.returncode == 1
        and "policies rejected" in rejected.stderr
        and "broken.yaml:1:1" in rejected.stderr
    )
