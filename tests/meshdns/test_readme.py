"""meshdns/README.md's example runs: its catalog is served by `sluice dns`, its digs answer.

A console line ending in ` &` starts a server (its first stdout line is compared); other
`$` lines run in a shell. Port 8600 is replaced by a free port.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "meshdns" / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\s*$", re.S | re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (Debian: dnsutils)")
def test_readme_example(tmp_path: Path) -> None:
    blocks = _BLOCK.findall(README.read_text(encoding="utf-8"))
    for lang, body in blocks:
        if lang == "yaml":
            (tmp_path / body.splitlines()[0].removeprefix("# file: ")).write_text(body)
    [console] = [body for lang, body in blocks if lang == "console"]
    port = str(free_port())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    steps: list[tuple[str, list[str]]] = []
    for line in console.replace("8600", port).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    servers: list[subprocess.Popen[str]] = []
    try:
        for command, expected in steps:
            if command.endswith(" &"):
                p = subprocess.Popen(
                    shlex.split(command[:-2]),
                    cwd=tmp_path,
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                servers.append(p)
                assert p.stdout is not None
                assert p.stdout.readline().rstrip("\n") == "\n".join(expected)
                continue
            r = subprocess.run(
                command,
                shell=True,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert (r.stdout + r.stderr).rstrip("\n") == "\n".join(expected), f"$ {command}"
    finally:
        for p in servers:
            p.terminate()
            try:
                _out, err = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise
            assert p.returncode == 0, err
            assert "meshdns stopped: queries=" in err
