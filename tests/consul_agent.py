"""A Consul HTTP API for tests: the agent at CONSUL_HTTP_ADDR when set (a real Consul, with
CONSUL_HTTP_TOKEN if its ACLs need one), otherwise `sluice up`'s embedded catalog.

The fixture sets CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN for the test, so code that builds
`consul.Consul()` from the environment (meshdns's ConsulCatalog, sidecars) reaches the
same agent the test talks to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import consul
import pytest

from tests.mesh.conftest import ControlPlane


@dataclass
class Agent:
    addr: str  # http://host:port
    token: str | None
    embedded: ControlPlane | None  # None: a real agent at CONSUL_HTTP_ADDR

    def client(self, token: str | None = None) -> consul.Consul:
        host, _, port = self.addr.split("//")[-1].rpartition(":")
        return consul.Consul(host=host, port=int(port), token=token or self.token)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    real = os.environ.get("CONSUL_HTTP_ADDR")
    if real:
        addr = real if "//" in real else "http://" + real
        yield Agent(addr, os.environ.get("CONSUL_HTTP_TOKEN"), None)
        return
    cp = ControlPlane(Path(tmp_path_factory.mktemp("consul")) / "data", "--no-dns")
    cp.start()
    try:
        yield Agent(cp.url, cp.admin_token, cp)
    finally:
        assert cp.stop() == 0, cp.output()


@pytest.fixture
def agent_env(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> Agent:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.addr)
    if agent.token:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", agent.token)
    return agent
