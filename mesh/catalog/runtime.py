"""The embedded catalog on the event loop: writes with persistence, blocking-query waits,
TTL expiry and the TCP and HTTP checks the control plane runs itself.

Every mutation of the model happens on the loop; SQLite writes run in a worker thread
under `_writes` (an asyncio.Lock), so they reach the database in the order they happened.
Waiters hold no lock: a change replaces `_changed` (an Event) after setting it, and each
waiter re-reads its own index (Consul's rule: a wake-up is no promise of a change).

Checks (developer.hashicorp.com/consul/docs/services/usage/checks): TCP passes when a
connection opens within the timeout; HTTP passes on 2xx, warns on 429, is critical on
anything else or no answer; TTL checks turn critical when not updated within their TTL.
A check runs at once when registered, then every interval. Runs are bounded by their
timeout; at most `MAX_RUNNING` run at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio.to_thread
import httpx

from mesh.catalog.model import Check, Model
from mesh.catalog.parse import CheckSpec, ServiceSpec
from mesh.catalog.persist import CatalogStore
from mesh.store.db import Database

log = logging.getLogger("sluice.catalog")

EXPIRY_TICK = 0.1  # how often TTL deadlines are looked at
MAX_RUNNING = 64  # TCP/HTTP checks in flight at once
MAX_OUTPUT = 4096  # of an HTTP check's body, kept as Output (Consul keeps 4 KiB)


class EmbeddedCatalog:
    def __init__(
        self,
        db: Database,
        *,
        node: str,
        node_address: str = "127.0.0.1",
        datacenter: str = "dc1",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.sluice"))
        self.model = Model(node, node_address, node_id, datacenter)
        self.store = CatalogStore(db)
        self.clock = clock
        self.loaded = self.store.load(self.model, clock())
        self.closing = False
        self._changed = asyncio.Event()
        self._writes = asyncio.Lock()
        self._runners: dict[str, tuple[CheckSpec, asyncio.Task[None]]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_RUNNING)
        self._http: httpx.AsyncClient | None = None
        self._http_insecure: httpx.AsyncClient | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._ticker = asyncio.create_task(self._expire_loop(), name="catalog-ttl")
        self._reconcile()

    def release(self) -> None:
        """Shutting down: answer every blocking query now, with the current state, and any
        later one at once (`sluice up` calls this on its signal, before uvicorn waits for
        open requests; a watch held for minutes would otherwise outlast the grace period)."""
        self.closing = True
        self._notify()

    async def close(self) -> None:
        self.release()
        tasks = [t for _, t in self._runners.values()]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runners.clear()
        for client in (self._http, self._http_insecure):
            if client is not None:
                await client.aclose()

    # -- blocking queries -----------------------------------------------------------------

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait(self, current: Callable[[], int], index: int, timeout: float) -> None:
        """Return when current() > index, after `timeout`, or on shutdown. An index above
        the current one (a client of a catalog whose data was reset) answers at once."""
        if index <= 0 or index > current():
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while current() <= index and not self.closing:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # -- writes ---------------------------------------------------------------------------

    async def register(self, spec: ServiceSpec) -> None:
        async with self._writes:
            self.model.register(spec, self.clock())
            index = self.model.index
            self._notify()
            self._reconcile()
            await anyio.to_thread.run_sync(self.store.save_service, spec.to_json(), index)

    async def deregister(self, service_id: str) -> bool:
        async with self._writes:
            if not self.model.deregister(service_id):
                return False
            index = self.model.index
            self._notify()
            self._reconcile()
            await anyio.to_thread.run_sync(self.store.delete_service, service_id, index)
            return True

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        """Raises model.UnknownCheck / NotTtl. Statuses are not persisted: no disk write."""
        if self.model.update_ttl(check_id, status, output, self.clock()):
            self._notify()

    async def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        async with self._writes:
            if not self.model.kv_put(key, value, flags, cas):
                return False
            entry = self.model.kv[key]
            self._notify()
            await anyio.to_thread.run_sync(self.store.save_kv, entry)
            return True

    async def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        async with self._writes:
            before = set(self.model.kv)
            if not self.model.kv_delete(key, recurse, cas):
                return False
            gone = sorted(before - set(self.model.kv))
            index = self.model.index
            self._notify()
            await anyio.to_thread.run_sync(self.store.delete_kv, gone, index)
            return True

    # -- TTL expiry -----------------------------------------------------------------------

    async def _expire_loop(self) -> None:
        while not self.closing:
            await asyncio.sleep(EXPIRY_TICK)
            try:
                await self._expire()
            except Exception:  # a bug here must not stop expiry for good
                log.exception("catalog expiry failed")

    async def _expire(self) -> None:
        before = set(self.model.services)
        if not self.model.expire(self.clock()):
            return
        self._notify()
        gone = before - set(self.model.services)
        if gone:
            self._reconcile()
            async with self._writes:
                for service_id in sorted(gone):
                    log.info("service %s deregistered: critical for too long", service_id)
                    await anyio.to_thread.run_sync(
                        self.store.delete_service, service_id, self.model.index
                    )

    # -- TCP and HTTP checks --------------------------------------------------------------

    def _reconcile(self) -> None:
        """One runner task per TCP/HTTP check registered; stop those of removed checks and
        restart those whose definition changed."""
        if self._ticker is None:
            return  # not started yet: start() reconciles
        wanted = {
            cid: c.spec for cid, c in self.model.checks.items() if c.spec.kind in ("tcp", "http")
        }
        for cid, (spec, task) in list(self._runners.items()):
            if wanted.get(cid) != spec:
                task.cancel()
                del self._runners[cid]
        for cid, spec in wanted.items():
            if cid not in self._runners:
                task = asyncio.create_task(self._run_check(cid, spec), name=f"check-{cid}")
                self._runners[cid] = (spec, task)

    async def _run_check(self, check_id: str, spec: CheckSpec) -> None:
        while not self.closing:
            async with self._slots:
                status, output = await self._probe(spec)
            check: Check | None = self.model.checks.get(check_id)
            if check is None or check.spec != spec:
                return
            if self.model.set_status(check, status, output, self.clock()):
                self._notify()
            await asyncio.sleep(spec.interval)

    async def _probe(self, spec: CheckSpec) -> tuple[str, str]:
        try:
            if spec.kind == "tcp":
                host, _, port = spec.target.rpartition(":")
                _r, writer = await asyncio.wait_for(
                    asyncio.open_connection(host.strip("[]"), int(port)), spec.timeout
                )
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return "passing", f"TCP connect {spec.target}: Success"
            client = self._client(spec.tls_skip_verify)
            r = await client.request(
                spec.method, spec.target, headers=list(spec.header), timeout=spec.timeout
            )
            body = r.text[:MAX_OUTPUT]
            line = f"HTTP {spec.method} {spec.target}: {r.status_code} {r.reason_phrase}"
            line += f" Output: {body}"
            if 200 <= r.status_code < 300:
                return "passing", line
            return ("warning" if r.status_code == 429 else "critical"), line
        except TimeoutError:
            what = f"{spec.kind.upper()} {spec.target}"
            return "critical", f"{what}: timed out after {spec.timeout:g}s"
        except (OSError, ValueError, httpx.HTTPError) as exc:
            return "critical", f"{spec.kind.upper()} {spec.target}: {exc or type(exc).__name__}"

    def _client(self, insecure: bool) -> httpx.AsyncClient:
        if insecure:
            if self._http_insecure is None:
                self._http_insecure = httpx.AsyncClient(verify=False, follow_redirects=False)
            return self._http_insecure
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http


def snapshot_json(model: Model) -> dict[str, Any]:
    """Counts for logs and tests."""
    return {"services": len(model.services), "checks": len(model.checks), "keys": len(model.kv)}
