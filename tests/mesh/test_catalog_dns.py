"""`sluice up` runs meshdns over its embedded catalog: `dig` answers follow registrations
and health changes made through py-consul."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from tests.mesh.conftest import ControlPlane


@pytest.fixture
def up_with_dns(tmp_path: Path) -> Iterator[tuple[ControlPlane, int]]:
    cp = ControlPlane(tmp_path / "data", "--dns-listen", "127.0.0.1:0")
    cp.start()
    try:
        port = 0
        for _ in range(100):
            m = re.search(r"DNS on 127\.0\.0\.1:(\d+) \(udp, tcp\)", cp.output())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.05)
        assert port, cp.output()
        yield cp, port
    finally:
        assert cp.stop() == 0, cp.output()


def dig(port: int, name: str, *extra: str) -> list[str]:
    r = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), name, "+short", "+time=2", "+tries=1", *extra],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    return sorted(r.stdout.split())


def until(fn: object, want: list[str], timeout: float = 5.0) -> list[str]:
    assert callable(fn)
    deadline = time.monotonic() + timeout
    got: list[str] = fn()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = fn()
    return got


def test_dig_follows_registrations_and_health(up_with_dns: tuple[ControlPlane, int]) -> None:
    cp, port = up_with_dns
    assert "catalog:         Consul API on" in cp.output()
    host, _, api_port = cp.url.split("//")[1].rpartition(":")
    c = consul.Consul(host=host, port=int(api_port), token=cp.admin_token)
    try:
        for i, addr in enumerate(("10.7.0.1", "10.7.0.2")):
            c.agent.service.register("orders-db", service_id=f"db{i}", address=addr, port=5432,
                                     tags=["primary"] if i == 0 else [],
                                     check=consul.Check.ttl("30s"))  # fmt: skip
        # Checks start critical: no healthy instance yet, so NXDOMAIN (Consul's rule).
        assert dig(port, "orders-db.service.consul") == []
        c.agent.check.ttl_pass("service:db0")
        c.agent.check.ttl_pass("service:db1")
        a = lambda: dig(port, "orders-db.service.consul")  # noqa: E731
        assert until(a, ["10.7.0.1", "10.7.0.2"]) == ["10.7.0.1", "10.7.0.2"]
        assert dig(port, "primary.orders-db.service.consul") == ["10.7.0.1"]
        assert "5432" in dig(port, "orders-db.service.consul", "SRV", "+tcp")
        c.agent.check.ttl_fail("service:db1")
        assert until(a, ["10.7.0.1"]) == ["10.7.0.1"]
        c.agent.service.deregister("db0")
        assert until(a, []) == []
    finally:
        c.http.close()
