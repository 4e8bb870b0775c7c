"""meshdns inside `sluice up`: the `Catalog` interface read straight from the embedded model.

In process there is no HTTP in between: `instances()` reads the model on the event loop
(where the DNS server runs too), and `index` is the model's write counter, so meshdns's
packed-answer cache rebuilds after any change. Instances are built once per index.
`attach` starts the DNS server with the app and stops it with the app; a port already in
use is reported and the control plane runs on without DNS.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI

from mesh.catalog.model import Model
from mesh.catalog.runtime import EmbeddedCatalog
from meshdns.answer import Answerer
from meshdns.catalog import Health, Instance, Node
from meshdns.server import DnsServer, ServerConfig

log = logging.getLogger("sluice.catalog")


class ModelCatalog:
    """meshdns.catalog.Catalog over the embedded catalog's model."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._built = -1
        self._services: dict[str, tuple[Instance, ...]] = {}

    @property
    def index(self) -> int:
        return self.model.index

    @property
    def datacenter(self) -> str:
        return self.model.datacenter.lower()

    def instances(self, service: str) -> Sequence[Instance] | None:
        if self._built != self.model.index:
            self._rebuild()
        return self._services.get(service.lower())

    def node(self, name: str) -> Node | None:
        m = self.model
        return Node(m.node.lower(), m.node_address) if name.lower() == m.node.lower() else None

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _rebuild(self) -> None:
        m = self.model
        out: dict[str, list[Instance]] = {}
        for s in m.services.values():
            health: Health = "passing"
            worst = m.health(s)
            if worst in ("warning", "critical"):
                health = "warning" if worst == "warning" else "critical"
            out.setdefault(s.spec.name.lower(), []).append(
                Instance(
                    service=s.spec.name.lower(),
                    address=s.spec.address or m.node_address,
                    port=s.spec.port,
                    node=m.node.lower(),
                    node_address=m.node_address,
                    tags=frozenset(t.lower() for t in s.spec.tags),
                    health=health,
                    meta=s.spec.meta,
                )
            )
        self._services = {k: tuple(v) for k, v in out.items()}
        self._built = m.index


def attach(
    app: FastAPI, host: str, port: int, on_ready: Callable[[str], None], **answerer: Any
) -> None:
    """Run meshdns on HOST:PORT (UDP and TCP) for the lifetime of `app`; `on_ready` gets
    "HOST:PORT" once both sockets are bound, or a message starting "not started"."""
    catalog: EmbeddedCatalog = app.state.catalog
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        answers = Answerer(ModelCatalog(catalog.model), **answerer)
        server = DnsServer(answers, ServerConfig(host, port))
        started = False
        try:
            await server.start()
            started = True
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"{shown}:{server.port}")
        except OSError as exc:
            on_ready(f"not started: cannot listen on {host}:{port}: {exc.strerror or exc}")
        try:
            async with inner(a) as value:
                yield value
        finally:
            if started:
                await server.close()

    app.router.lifespan_context = lifespan
