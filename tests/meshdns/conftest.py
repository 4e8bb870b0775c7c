"""Fixtures for meshdns: a catalog file, and a real server on a loopback port in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from meshdns.answer import Answerer
from meshdns.catalog import StaticCatalog
from meshdns.forward import Forwarder
from meshdns.server import DnsServer, ServerConfig

CATALOG = """\
datacenter: dc1
nodes:
  node-a: 10.0.0.1
  node-b: 10.0.0.2
services:
  web:
    - {address: 10.0.0.11, port: 8080, node: node-a, tags: [v1, blue]}
    - {address: 10.0.0.12, port: 8081, node: node-b, tags: [v2], health: warning}
    - {address: 10.0.0.13, port: 8082, node: node-b, tags: [v1], health: critical}
  orders-db:
    - {port: 5432, node: node-a, tags: [primary]}
  v6only:
    - {address: "fd00::7", port: 9000, node: node-b}
  down:
    - {address: 10.0.0.99, port: 1, node: node-b, health: critical}
"""


def many(n: int) -> str:
    """A catalog with one service of `n` instances (for truncation)."""
    lines = ["services:", "  big:"]
    lines += [
        f"    - {{address: 10.1.{i // 250}.{i % 250 + 1}, port: {1000 + i}, node: n{i}}}"
        for i in range(n)
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG)
    return path


@pytest.fixture
def catalog(catalog_file: Path) -> StaticCatalog:
    return StaticCatalog(catalog_file)


class ServerThread:
    """A DnsServer on 127.0.0.1:<free port>, its uvloop loop in a thread; `stop()` closes all."""

    def __init__(
        self, answerer: Answerer, forwarder: Forwarder | None = None, **config: float
    ) -> None:
        self.loop = uvloop.new_event_loop()
        self.server = DnsServer(answerer, ServerConfig(port=0, **config), forwarder)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.port = self.server.port

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[type[ServerThread]]:
    """Start servers with `serve(answerer, forwarder)`; every one is stopped after the test."""
    started: list[ServerThread] = []

    class Tracked(ServerThread):
        def __init__(self, *args: object, **kwargs: float) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    yield Tracked
    for s in reversed(started):
        s.stop()
