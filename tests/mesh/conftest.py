"""A real control plane for the tests: `sluice up` as a subprocess on a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SLUICE = str(Path(sys.executable).parent / "sluice")
_URL = re.compile(r"control API on (http://\S+)")
VALID = (
    "apiVersion: sluice/v1\nkind: Policy\nmetadata: {{name: {name}}}\nspec:\n"
    "  destination: orders-db\n  rules:\n    - name: no-drop\n"
    "      sql: {{verbs: [DROP]}}\n      action: deny\n"
)


def policy_text(name: str = "guard") -> str:
    return VALID.format(name=name)


class ControlPlane:
    """One `sluice up` process over `data_dir`; start, stop (SIGTERM) and kill (SIGKILL)."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log = data_dir.parent / f"{data_dir.name}.log"

    def start(self, *more: str, timeout: float = 20.0) -> ControlPlane:
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "ab")  # noqa: SIM115 - the child holds it; closed on stop
        self._out = out
        self.proc = subprocess.Popen(
            [
                SLUICE,
                "up",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                *self.extra,
                *more,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _URL.search(self.log.read_text(errors="replace")[offset:])
            if m:
                self.url = m.group(1)
                self._wait_ready(deadline)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sluice up did not start:\n{self.log.read_text()}")

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/v1/openapi.json", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def client(self, token: str | None = None) -> httpx.Client:
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = 0
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            code = self.proc.wait(timeout=20)
            self.proc = None
            self._out.close()
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane shared by the tests that do not restart it (they use unique names)."""
    cp = ControlPlane(tmp_path_factory.mktemp("cp") / "data", "--heartbeat-interval", "0.5")
    cp.start()
    yield cp
    assert cp.stop() == 0, cp.output()


@pytest.fixture
def admin(control: ControlPlane) -> Iterator[httpx.Client]:
    with control.client() as c:
        yield c


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane of this test's own, stopped afterwards."""
    cp = ControlPlane(tmp_path / "data")
    yield cp
    cp.stop()


def cli(cp: ControlPlane, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SLUICE_CONTROL=cp.url, SLUICE_TOKEN=token or cp.admin_token)
    return subprocess.run(
        [SLUICE, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )
