"""`sluice dns` argument errors: exit 2 for usage, 1 for a catalog that cannot be used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SLUICE = str(Path(sys.executable).parent / "sluice")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--catalog-file", "x.yaml", "--listen", "nope"], 2, "expected HOST:PORT, got 'nope'"),
        (["--catalog-file", "x.yaml", "--vip", "db"], 2, "--vip expects NAME=IP[:PORT]"),
        (["--catalog-file", "x.yaml", "--vip", "db=host"], 2, "'host' is not an IP address"),
        (["--catalog-file", "x.yaml", "--recursor", "1.1.1.1"], 2, "expected HOST:PORT"),
        (["--catalog-file", "/nonexistent/x.yaml"], 1, "No such file or directory"),
        ([], 2, "one of the arguments --catalog-file --consul is required"),
    ],
)
def test_usage_errors(args: list[str], code: int, message: str) -> None:
    r = subprocess.run(
        [SLUICE, "dns", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert r.returncode == code and message in r.stderr, r.stderr
