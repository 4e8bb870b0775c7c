"""The sidecar's side of the service catalog, through py-consul (`import consul`).

- `consul_client`: the catalog is the control plane given by `--control` (its token, as
  X-Consul-Token), or the Consul agent at `CONSUL_HTTP_ADDR` when that is set (with
  `CONSUL_HTTP_TOKEN`), so a real Consul needs no code change.
- `ServiceWatch`: a daemon thread holding a blocking query on
  `/v1/health/service/<name>?passing[&tag=]` and handing each new list of instances to the
  route's `Picker` on the event loop (`call_soon_threadsafe`). The data path only reads
  the picker; it never waits on HTTP.
- `Registration`: a daemon thread registering the sidecar's app instance
  (`/v1/agent/service/register`, service = app, ID = instance) and where the sidecar serves
  each route (`route_entry`), each with a TTL check it passes every TTL/3; registered again
  when the catalog forgot one (404); deregistered on a clean stop.

Route listeners are registered under a service of their own, `<app>-sidecar` (ID
`<instance>:<route service>:<port>`, tag `sluice-route`, Meta app, instance, route_service,
protocol, upstream), never under the route's service: other sidecars pick upstream
instances from `NAME.service`, and a sidecar listener picked there would loop. meshdns's
DNS-VIP mode reads them (`sluice dns --vip-from-catalog APP`, meshdns/README.md).

Blocking HTTP calls cannot be interrupted from outside: a thread stops within one `wait`
of `close()` (the threads are daemons, so a process exit does not wait for them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import consul

from sidecar.config import ControlConfig, Route, ServiceUpstream
from sidecar.upstreams import Instance

log = logging.getLogger("sluice.catalog")

WAIT = "30s"  # how long a blocking query may hold
MIN_INTERVAL = 0.05  # between blocking queries that returned at once
MAX_BACKOFF = 10.0
CALL_TIMEOUT = 5.0  # seconds for a call that does not block (plus the wait for one that does)
TTL = 15.0  # the registration's TTL check; passed every TTL/3
DEREGISTER_AFTER = "1m"  # a registration critical this long (a crashed sidecar) is removed
ROUTE_SUFFIX = "-sidecar"  # route listeners of app A are instances of service A-sidecar
ROUTE_TAG = "sluice-route"


def consul_client(control: ControlConfig | None) -> Any:
    """A py-consul client for the catalog: CONSUL_HTTP_ADDR when set, else the control plane
    (else Consul's default, 127.0.0.1:8500, which is also `sluice up`'s)."""
    if os.environ.get("CONSUL_HTTP_ADDR") or control is None:
        return consul.Consul(connections_timeout=CALL_TIMEOUT)
    parts = urllib.parse.urlsplit(control.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return consul.Consul(
        host=parts.hostname or "127.0.0.1",
        port=port,
        scheme=parts.scheme,
        token=control.token,
        connections_timeout=CALL_TIMEOUT,
    )


def healthy_instances(entries: Sequence[Mapping[str, Any]]) -> tuple[Instance, ...]:
    """/v1/health/service/<name> entries as instances; the service address, else the node's.
    Entries without a usable address or port are left out."""
    out = []
    for e in entries:
        node, svc = e.get("Node") or {}, e.get("Service") or {}
        host = str(svc.get("Address") or node.get("Address") or "")
        port = int(svc.get("Port") or 0)
        if host and 0 < port < 65536:
            out.append(Instance(str(svc.get("ID") or f"{host}:{port}"), host, port))
    return tuple(out)


class ServiceWatch:
    """Keeps one service's healthy instances current for a callback on the event loop."""

    def __init__(
        self,
        client: Callable[[], Any],
        service: ServiceUpstream,
        loop: asyncio.AbstractEventLoop,
        changed: Callable[[tuple[Instance, ...]], None],
        wait: str = WAIT,
    ) -> None:
        self.service = service
        self._client = client
        self._loop = loop
        self._changed = changed
        self.wait = wait
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"sluice-watch-{service.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        client = self._client()
        index: int | None = None
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    raw, entries = client.health.service(
                        self.service.name,
                        index=index,
                        wait=self.wait,
                        passing=True,
                        tag=self.service.tag,
                    )
                except Exception as exc:  # network, HTTP and decoding errors alike
                    failures += 1
                    delay = min(MAX_BACKOFF, 0.25 * 2 ** min(failures, 8))
                    if failures == 1:
                        log.warning(
                            "catalog: watching %s failed (%s); keeping the last list, retrying",
                            self.service.name,
                            str(exc) or type(exc).__name__,
                        )
                    self._stop.wait(delay)
                    continue
                if failures:
                    log.info("catalog: watching %s again", self.service.name)
                failures = 0
                new = int(raw or 0)
                if index is None or new != index:
                    self._hand_over(healthy_instances(entries or []))
                # Consul: reset when the index goes backwards or is not positive.
                index = new if new > 0 and (index is None or new >= index) else 0
                self._stop.wait(MIN_INTERVAL)
        finally:
            client.http.close()

    def _hand_over(self, instances: tuple[Instance, ...]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._changed, instances)
        except RuntimeError:  # the loop is closed: the sidecar has stopped
            self._stop.set()


@dataclass(frozen=True, slots=True)
class Entry:
    """One service instance the sidecar keeps registered (and passing) in the catalog."""

    name: str
    id: str
    tags: tuple[str, ...]
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    address: str | None = None
    port: int | None = None

    @property
    def check_id(self) -> str:
        return f"service:{self.id}"


def route_entry(app: str, instance: str, route: Route, listen: tuple[str, int]) -> Entry:
    """Where this sidecar serves `route` for its app (`listen`: the bound address). A
    wildcard address is registered as loopback of its family: where the app reaches it."""
    host, port = listen
    try:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            host = "::1" if ip.version == 6 else "127.0.0.1"
    except ValueError:
        pass  # a host name: registered as given
    meta = {
        "app": app,
        "instance": instance,
        "route_service": route.service,
        "protocol": route.protocol,
        "upstream": route.upstream_label,
    }
    # Two routes for one service (on two ports) get an ID each.
    sid = f"{instance}:{route.service}:{port}"
    return Entry(app + ROUTE_SUFFIX, sid, ("sluice", ROUTE_TAG), meta, host, port)


class Registration:
    """The sidecar's app instance (and its route listeners) in the catalog, kept passing
    while the sidecar runs."""

    def __init__(
        self,
        client: Callable[[], Any],
        app: str,
        instance: str,
        *,
        meta: Mapping[str, str] | None = None,
        routes: Sequence[Entry] = (),
        ttl: float = TTL,
    ) -> None:
        self.app, self.instance = app, instance
        self.meta = dict(meta or {})
        self.ttl = ttl
        self.check_id = f"service:{instance}"
        # Listeners first: once the app instance shows, so do they (deregistered the other
        # way round).
        self.entries = (*routes, Entry(app, instance, ("sluice",), self.meta))
        self.registered = threading.Event()  # set once the catalog took them all
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"sluice-register-{instance}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = CALL_TIMEOUT) -> None:
        """End the TTL passes and deregister (blocking, bounded: call it from a thread)."""
        self._stop.set()
        self._thread.join(timeout)
        if not self.registered.is_set():
            return
        client = self._client()
        try:
            for entry in reversed(self.entries):  # the app instance first
                try:
                    client.agent.service.deregister(entry.id)
                    log.info("catalog: %s deregistered", entry.id)
                except Exception as exc:  # the check's DeregisterCriticalServiceAfter cleans up
                    log.warning("catalog: deregistering %s failed: %s", entry.id, exc)
        finally:
            client.http.close()

    def _register(self, client: Any) -> None:
        for entry in self.entries:
            check = {
                "CheckID": entry.check_id,
                "Name": f"sluice sidecar {entry.id}",
                "TTL": f"{self.ttl:g}s",
                "Status": "passing",
                "DeregisterCriticalServiceAfter": DEREGISTER_AFTER,
            }
            client.agent.service.register(
                entry.name,
                service_id=entry.id,
                address=entry.address,
                port=entry.port,
                tags=list(entry.tags),
                meta=dict(entry.meta),
                check=check,
            )
            log.info("catalog: registered %s as an instance of %s", entry.id, entry.name)
        self.registered.set()

    def _pass(self, client: Any) -> bool:
        """Pass every TTL check; False when the catalog does not know one (404)."""
        return all(client.agent.check.ttl_pass(e.check_id) for e in self.entries)

    def _run(self) -> None:
        client = self._client()
        failures = 0
        fresh = True
        try:
            while not self._stop.is_set():
                try:
                    if fresh:
                        self._register(client)
                        fresh = False
                    elif not self._pass(client):
                        fresh = True  # 404: the catalog lost one (a real agent restarted)
                    failures = 0
                    delay = MIN_INTERVAL if fresh else self.ttl / 3
                except Exception as exc:  # network, HTTP and decoding errors alike
                    fresh = True  # registering again is idempotent, and fixes a lost check
                    failures += 1
                    delay = min(self.ttl / 3, 0.25 * 2 ** min(failures, 8))
                    if failures == 1:
                        log.warning("catalog: registering %s failed: %s", self.instance, exc)
                self._stop.wait(delay)
        finally:
            client.http.close()
