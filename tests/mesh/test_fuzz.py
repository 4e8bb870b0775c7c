"""An API fuzzer (schemathesis) against the served OpenAPI document: no request gets a 5xx.

Runs on a control plane of its own (the fuzzer applies policies, rolls back and deletes
tokens). The live stream is left out: it never ends by design. Bounded by --max-examples
and a time limit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.mesh.conftest import ControlPlane

ST = str(Path(sys.executable).parent / "st")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_no_5xx(fresh: ControlPlane, tmp_path: Path) -> None:
    fresh.start("--policies", str(REPO / "examples" / "policies"))
    r = subprocess.run(
        [
            ST, "run", f"{fresh.url}/v1/openapi.json",
            "-H", f"Authorization: Bearer {fresh.admin_token}",
            "--checks", "not_a_server_error",
            "--max-examples", "25",
            "--exclude-path", "/v1/audit/stream",
            "--request-timeout", "40",
            "--seed", "7",
            "--no-color",
        ],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "500" not in fresh.output()
