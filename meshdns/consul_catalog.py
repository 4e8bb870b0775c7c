"""A `Catalog` kept current from a Consul HTTP API (a real agent, or Sluice's embedded one).

Everything goes through py-consul (`import consul`), so `CONSUL_HTTP_ADDR` (and
`CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_SSL`) select the agent exactly as for the `consul` CLI.
Background threads run blocking queries (developer.hashicorp.com/consul/api-docs/features/
blocking) and swap immutable snapshots into memory; `instances()` and `node()` only read
those, so answering DNS never waits on HTTP:

- one thread on /v1/catalog/services: the set of service names; it starts and stops
- one thread per service on /v1/health/service/<name> (`?passing` with `only_passing`;
  otherwise all entries, with health computed from the checks as Consul's DNS does), and
- one thread on /v1/catalog/nodes for `name.node.consul`.

Each loop follows Consul's advice for blocking queries: reset the index when it goes
backwards or is not positive, wait at least `MIN_INTERVAL` between calls that returned at
once, and back off exponentially on errors. Threads are daemons and stop within one
`wait` of `close()`: a blocking HTTP call cannot be interrupted from outside.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import consul

from meshdns.catalog import DEFAULT_DATACENTER, Health, Instance, Node

log = logging.getLogger("sluice.meshdns")

MIN_INTERVAL = 0.05
MAX_BACKOFF = 30.0
DEFAULT_WAIT = "30s"
MAX_SERVICES = 2048  # watcher threads; past this, further services are not answered


def client_for(url: str | None) -> Callable[[], Any]:
    """A factory of py-consul clients for `url` (or CONSUL_HTTP_ADDR when None)."""
    if url is None:
        return lambda: consul.Consul()
    parts = urllib.parse.urlsplit(url if "//" in url else "//" + url)
    scheme = parts.scheme or "http"
    host, port = parts.hostname or "127.0.0.1", parts.port or 8500
    return lambda: consul.Consul(host=host, port=port, scheme=scheme)


def health_of(checks: Sequence[Mapping[str, Any]]) -> Health:
    """The worst status among an entry's checks (node checks included), as Consul's DNS."""
    statuses = {str(c.get("Status", "")) for c in checks}
    if "critical" in statuses:
        return "critical"
    return "warning" if "warning" in statuses else "passing"


def instances_from_health(name: str, entries: Sequence[Mapping[str, Any]]) -> tuple[Instance, ...]:
    """/v1/health/service/<name> entries (Node, Service, Checks) as instances."""
    out = []
    for e in entries:
        node, svc = e.get("Node") or {}, e.get("Service") or {}
        node_address = str(node.get("Address", ""))
        out.append(
            Instance(
                service=name,
                address=str(svc.get("Address") or node_address),
                port=int(svc.get("Port") or 0),
                node=str(node.get("Node", "")).lower(),
                node_address=node_address,
                tags=frozenset(str(t).lower() for t in svc.get("Tags") or ()),
                health=health_of(e.get("Checks") or ()),
                meta={str(k): str(v) for k, v in (svc.get("Meta") or {}).items()},
            )
        )
    return tuple(out)


class ConsulCatalog:
    def __init__(
        self,
        url: str | None = None,
        *,
        datacenter: str = DEFAULT_DATACENTER,
        only_passing: bool = False,
        wait: str = DEFAULT_WAIT,
        client: Callable[[], Any] | None = None,
    ) -> None:
        self._client = client or client_for(url)
        self._datacenter = datacenter.lower()
        self.only_passing = only_passing
        self.wait = wait
        self._index = 1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._services: dict[str, tuple[Instance, ...]] = {}
        self._nodes: dict[str, Node] = {}
        self._watchers: dict[str, threading.Event] = {}
        self._synced: set[str] = set()
        self._listed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawn("catalog-services", self._watch_services)
        self._spawn("catalog-nodes", self._watch_nodes)

    @property
    def index(self) -> int:
        return self._index

    @property
    def datacenter(self) -> str:
        return self._datacenter

    def instances(self, service: str) -> Sequence[Instance] | None:
        return self._services.get(service)

    def node(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def poll(self) -> None:
        pass  # the watcher threads keep the snapshot current

    def wait_synced(self, timeout: float) -> bool:
        """Block (a caller's thread, not the loop) until every listed service was read."""
        if not self._listed.wait(timeout):
            return False
        for _ in range(int(timeout / 0.05) + 1):
            with self._lock:
                if set(self._watchers) <= self._synced:
                    return True
            if self._stop.wait(0.05):
                return False
        return False

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for stop in self._watchers.values():
                stop.set()

    # -- watchers (background threads) ----------------------------------------------------

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=f"meshdns-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _bump(self) -> None:
        with self._lock:
            self._index += 1

    def _watch_services(self) -> None:
        def changed(services: Any) -> None:
            names = {str(n).lower() for n in services or {}}
            with self._lock:
                for gone in set(self._watchers) - names:
                    self._watchers.pop(gone).set()
                    self._services.pop(gone, None)
                    self._synced.discard(gone)
                for new in sorted(names - set(self._watchers)):
                    if len(self._watchers) >= MAX_SERVICES:
                        log.warning("more than %d services: %s not watched", MAX_SERVICES, new)
                        break
                    stop = threading.Event()
                    self._watchers[new] = stop
                    self._spawn(f"health-{new}", _bind(self._watch_health, new, stop))
                self._index += 1
            self._listed.set()

        self._blocking(
            lambda c, i: c.catalog.services(index=i, wait=self.wait), changed, self._stop
        )

    def _watch_health(self, name: str, stop: threading.Event) -> None:
        def changed(entries: Any) -> None:
            with self._lock:
                if stop.is_set():
                    return
                self._services[name] = instances_from_health(name, entries or [])
                self._synced.add(name)
                self._index += 1

        def query(c: Any, i: int | None) -> Any:
            return c.health.service(name, index=i, wait=self.wait, passing=self.only_passing)

        self._blocking(query, changed, stop)

    def _watch_nodes(self) -> None:
        def changed(nodes: Any) -> None:
            self._nodes = {
                str(n["Node"]).lower(): Node(str(n["Node"]).lower(), str(n.get("Address", "")))
                for n in nodes or []
            }
            self._bump()

        self._blocking(lambda c, i: c.catalog.nodes(index=i, wait=self.wait), changed, None)

    def _blocking(
        self,
        query: Callable[[Any, int | None], tuple[Any, Any]],
        changed: Callable[[Any], None],
        stop: threading.Event | None,
    ) -> None:
        """One blocking-query loop until `stop` (or close()); never raises."""
        stop = stop or self._stop
        client = self._client()
        index: int | None = None
        failures = 0
        try:
            while not (stop.is_set() or self._stop.is_set()):
                try:
                    raw_index, data = query(client, index)
                except Exception as exc:  # network, HTTP and decoding errors alike
                    failures += 1
                    delay = min(MAX_BACKOFF, 0.25 * 2 ** min(failures, 8))
                    log.warning("consul query failed (retry in %.1fs): %r", delay, exc)
                    stop.wait(delay)
                    continue
                failures = 0
                new = int(raw_index or 0)
                if index is None or new != index:
                    changed(data)
                # Consul: reset when the index goes backwards or is not positive.
                index = new if new > 0 and (index is None or new >= index) else 0
                stop.wait(MIN_INTERVAL)
        finally:
            client.http.close()


def _bind(
    f: Callable[[str, threading.Event], None], name: str, stop: threading.Event
) -> Callable[[], None]:
    return lambda: f(name, stop)
