"""What meshdns needs to know about services and nodes, and the file-backed provider.

`Catalog` is the interface the answer layer reads: instances of a service (with tags and
health), nodes by name, the datacenter, and `index`, a counter that changes whenever any
answer could change (answers are cached against it). Reads must never block on I/O: a
provider keeps its data in memory and refreshes it in the background (`ConsulCatalog` in
`consul_catalog.py`) or from `poll()`, which the server calls from a worker thread every
`POLL_INTERVAL` seconds (`StaticCatalog`, below). Either way a refresh swaps an immutable
snapshot first and changes `index` after, so a reader that sees the new index sees the new
data.

`StaticCatalog` reads a YAML file and reloads it when its stat changes; a bad edit keeps
the last good catalog (fail static), like the sidecar's policy watcher:

    datacenter: dc1                  # optional, default dc1
    nodes:                           # optional: node name -> address
      node-a: 10.0.0.1
    services:
      orders-db:
        - {address: 10.0.0.11, port: 5432, node: node-a, tags: [primary], health: passing}
        - {address: 10.0.0.12, port: 5432, tags: [replica], health: critical}
      billing-sidecar:                 # DNS-VIP from the catalog: a sidecar's route listener
        - {address: 127.0.0.10, port: 5432, tags: [sluice-route],
           meta: {app: billing, instance: billing-1, route_service: orders-db}}

An instance without `address` uses its node's address (Consul's rule for an empty
ServiceAddress); `node` defaults to `local`; `health` defaults to `passing`. A node an
instance names but `nodes:` does not list takes the address of its first instance.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

log = logging.getLogger("sluice.meshdns")

Health = Literal["passing", "warning", "critical"]
HEALTH: tuple[Health, ...] = ("passing", "warning", "critical")
DEFAULT_DATACENTER = "dc1"
DEFAULT_NODE = "local"
POLL_INTERVAL = 0.5
# A catalog file is a config file, not a data set: refuse anything absurd before parsing.
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance of a service, as Consul's /v1/health/service returns it."""

    service: str
    address: str  # the service address, or the node's when the registration had none
    port: int
    node: str
    node_address: str
    tags: frozenset[str] = frozenset()
    health: Health = "passing"
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)  # Consul's Service.Meta


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    address: str


class Catalog(Protocol):
    """The read side of a service catalog, as meshdns uses it (see the module docstring)."""

    @property
    def index(self) -> int:
        """Changes whenever anything below may have changed."""
        ...

    @property
    def datacenter(self) -> str: ...

    def instances(self, service: str) -> Sequence[Instance] | None:
        """Every instance of `service` whatever its health; None for an unknown service."""
        ...

    def node(self, name: str) -> Node | None: ...

    def poll(self) -> None:
        """Called every POLL_INTERVAL seconds from a worker thread, never twice at once;
        it may take its time (answers are served meanwhile from the current snapshot)."""
        ...

    def close(self) -> None: ...


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class CatalogData:
    """An immutable snapshot: swapped whole, so readers never see half an update."""

    datacenter: str
    services: Mapping[str, tuple[Instance, ...]]
    nodes: Mapping[str, Node]


def parse_catalog(doc: Any, where: str = "catalog") -> CatalogData:
    """Validate a decoded YAML document (see the module docstring) into a snapshot."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise CatalogError(f"{where}: expected a mapping with 'services'")
    unknown = set(doc) - {"datacenter", "nodes", "services"}
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    dc = _name(doc.get("datacenter", DEFAULT_DATACENTER), f"{where}: datacenter")
    nodes: dict[str, Node] = {}
    raw_nodes = doc.get("nodes") or {}
    if not isinstance(raw_nodes, dict):
        raise CatalogError(f"{where}: nodes: expected a mapping of name to address")
    for name, address in raw_nodes.items():
        n = _name(name, f"{where}: nodes")
        nodes[n] = Node(n, _text(address, f"{where}: nodes: {n}"))
    services: dict[str, tuple[Instance, ...]] = {}
    raw_services = doc.get("services") or {}
    if not isinstance(raw_services, dict):
        raise CatalogError(f"{where}: services: expected a mapping of name to instances")
    for name, items in raw_services.items():
        s = _name(name, f"{where}: services")
        if not isinstance(items, list):
            raise CatalogError(f"{where}: services: {s}: expected a list of instances")
        services[s] = tuple(
            _instance(s, item, nodes, f"{where}: services: {s}[{i}]")
            for i, item in enumerate(items)
        )
    return CatalogData(dc, services, nodes)


def _instance(service: str, item: Any, nodes: dict[str, Node], where: str) -> Instance:
    if not isinstance(item, dict):
        raise CatalogError(f"{where}: expected a mapping")
    unknown = set(item) - {"address", "port", "node", "tags", "health", "meta"}
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    node = _name(item.get("node", DEFAULT_NODE), f"{where}: node")
    address = item.get("address")
    if address is None:
        if node not in nodes:
            raise CatalogError(f"{where}: no address, and node {node!r} is not under 'nodes'")
        address = nodes[node].address
    address = _text(address, f"{where}: address")
    nodes.setdefault(node, Node(node, address))
    port = item.get("port", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise CatalogError(f"{where}: port: expected 0-65535, got {port!r}")
    tags = item.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise CatalogError(f"{where}: tags: expected a list of strings")
    health = item.get("health", "passing")
    if health not in HEALTH:
        raise CatalogError(f"{where}: health: expected one of {', '.join(HEALTH)}")
    meta = item.get("meta", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CatalogError(f"{where}: meta: expected a mapping of strings to strings")
    return Instance(
        service,
        address,
        port,
        node,
        nodes[node].address,
        frozenset(t.lower() for t in tags),
        health,
        meta,
    )


def _name(value: Any, where: str) -> str:
    # DNS matching is case-insensitive: names are kept lowercased.
    text = _text(value, where).lower()
    if "." in text or len(text) > 63:
        raise CatalogError(f"{where}: {text!r} is not a DNS label (no dots, at most 63 chars)")
    return text


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise CatalogError(f"{where}: expected a non-empty string, got {value!r}")
    return value


class StaticCatalog:
    """A catalog read from a YAML file, reloaded by `poll()` when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.last_error: str | None = None
        self._index = 1
        self._stamp = self._current_stamp()
        self._data = self._load()  # at start there is no last good file: errors propagate

    @property
    def index(self) -> int:
        return self._index

    @property
    def datacenter(self) -> str:
        return self._data.datacenter

    def instances(self, service: str) -> Sequence[Instance] | None:
        return self._data.services.get(service)

    def node(self, name: str) -> Node | None:
        return self._data.nodes.get(name)

    def services(self) -> list[str]:
        return sorted(self._data.services)

    def poll(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            data = self._load()
        except (CatalogError, OSError) as exc:
            self.last_error = str(exc)
            log.error("catalog reload rejected; keeping the last good one: %s", exc)
            return
        self._data = data  # before the index: see the module docstring
        self._index += 1
        self.last_error = None
        log.info("catalog reloaded: %d services", len(data.services))

    def close(self) -> None:
        pass

    def _current_stamp(self) -> tuple[int, int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> CatalogData:
        with self.path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise CatalogError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise CatalogError(f"{self.path}: {exc}") from exc
        return parse_catalog(doc, str(self.path))
