"""The sidecar's side of the service catalog, through py-consul (`import consul`).

- `consul_client`: the catalog is the control plane given by `--control` (its token, as
  X-Consul-Token), or the Consul agent at `CONSUL_HTTP_ADDR` when that is set (with
  `CONSUL_HTTP_TOKEN`), so a real Consul needs no code change.
- `ServiceWatch`: a daemon thread holding a blocking query on
  `/v1/health/service/<name>?passing[&tag=]` and handing each new list of instances to the
  route's `Picker` on the event loop (`call_soon_threadsafe`). The data path only reads
  the picker; it never waits on HTTP.
- `Registration`: a daemon thread registering the sidecar's app instance
  (`/v1/agent/service/register`, service = app, ID = instance) with a TTL check it passes
  every TTL/3; registered again when the catalog forgot it (404); deregistered on a clean
  stop.

Blocking HTTP calls cannot be interrupted from outside: a thread stops within one `wait`
of `close()` (the threads are daemons, so a process exit does not wait for them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import consul

from sidecar.config import ControlConfig, ServiceUpstream
from sidecar.upstreams import Instance

log = logging.getLogger("sluice.catalog")

WAIT = "30s"  # how long a blocking query may hold
MIN_INTERVAL = 0.05  # between blocking queries that returned at once
MAX_BACKOFF = 10.0
CALL_TIMEOUT = 5.0  # seconds for a call that does not block (plus the wait for one that does)
TTL = 15.0  # the registration's TTL check; passed every TTL/3
DEREGISTER_AFTER = "1m"  # a registration critical this long (a crashed sidecar) is removed


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


class Registration:
    """The sidecar's app instance in the catalog, kept passing while the sidecar runs."""

    def __init__(
        self,
        client: Callable[[], Any],
        app: str,
        instance: str,
        *,
        meta: Mapping[str, str] | None = None,
        ttl: float = TTL,
    ) -> None:
        self.app, self.instance = app, instance
        self.meta = dict(meta or {})
        self.ttl = ttl
        self.check_id = f"service:{instance}"
        self.registered = threading.Event()  # set once the catalog took it
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
            client.agent.service.deregister(self.instance)
            log.info("catalog: %s deregistered", self.instance)
        except Exception as exc:  # the check's DeregisterCriticalServiceAfter cleans up
            log.warning("catalog: deregistering %s failed: %s", self.instance, exc)
        finally:
            client.http.close()

    def _register(self, client: Any) -> None:
        check = {
            "CheckID": self.check_id,
            "Name": f"sluice sidecar {self.instance}",
            "TTL": f"{self.ttl:g}s",
            "Status": "passing",
            "DeregisterCriticalServiceAfter": DEREGISTER_AFTER,
        }
        client.agent.service.register(
            self.app, service_id=self.instance, tags=["sluice"], meta=self.meta, check=check
        )
        self.registered.set()
        log.info("catalog: registered %s as an instance of %s", self.instance, self.app)

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
                    elif not client.agent.check.ttl_pass(self.check_id):
                        fresh = True  # 404: the catalog lost it (a real agent restarted)
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
