"""The README's control-plane quickstart runs as written (on a free port instead of 8500)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from tests.conftest import REPO
from tests.mesh.conftest import SLUICE, ControlPlane


def quickstart_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"From\s+another terminal:\n\n```sh\n(.*?)```", text, re.S)
    assert block, "README lost its control-plane quickstart block"
    lines = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("export ")]


def test_readme_quickstart_commands(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "sluice-data", "--policies", str(REPO / "examples" / "policies"))
    cp.start()
    try:
        env = dict(os.environ, SLUICE_CONTROL=cp.url, SLUICE_TOKEN=cp.admin_token)
        outputs = []
        for argv in quickstart_commands():
            assert argv[0] == ".venv/bin/sluice"
            done = subprocess.run(
                [SLUICE, *argv[1:]],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                check=False,
            )
            assert done.returncode == 0, (argv, done.stderr)
            outputs.append(done.stdout)
        assert "orders-db.yaml" in outputs[0]  # the policy list shows the applied example set
        assert outputs[1].startswith("sluice_")  # a sidecar token
    finally:
        assert cp.stop() == 0, cp.output()
