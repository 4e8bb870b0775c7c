"""The sidecar's control-plane client: register and heartbeat, watch policies, ship audit.

Three asyncio loops over one `httpx.AsyncClient`, each bounded by timeouts, none on the
data path (docs/api.md is the contract):

- policies: a blocking query loop on `GET /v1/sidecar/policies?index=N&wait=30s`. A new set
  is validated like `sluice policy check`; one the sidecar cannot load is logged and ignored
  (the last good set stays in force). A good one is stored in `<state-dir>/policies` and its
  `Engine` handed to `on_policies`, which swaps it into every route's decider.
- heartbeat: `PUT /v1/sidecars/{instance}` every 10 s with the routes, the enforced policy
  version and the spool's counters.
- shipper: the oldest spooled batch (at most 500 events) goes to `POST /v1/audit/events`
  and is acknowledged in the spool only after a 200; on failure it is sent again later.

Fail static: the last good set is loaded from the state dir before anything is asked of
the control plane, and enforced while the control plane is unreachable. Failed calls are
retried with capped exponential backoff and jitter (0.5 s doubling to 10 s). With no last
good set the sidecar waits `initial_wait` seconds for a first answer before it opens its
listeners, then starts with version 0: the empty set a control plane hands out before any
set is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from policies.engine import Engine
from policies.errors import PolicyError
from sidecar.config import ControlConfig
from sidecar.policy_store import PolicySet, PolicyStore, check_set, make_set
from sidecar.spool import Batch, Spool

log = logging.getLogger("sluice.control")

HEARTBEAT_INTERVAL = 10.0
POLICY_WAIT = 30  # seconds a blocking query may hold (the server caps it at 300)
BATCH_EVENTS = 500  # per POST; the server takes up to 5,000
SHIP_IDLE = 0.2  # how often an empty spool is looked at again
BACKOFF_FIRST, BACKOFF_CAP = 0.5, 10.0
INITIAL_WAIT = 5.0  # with no last good set: how long start() waits for a first answer
FINAL_SHIP = 2.0  # at stop: how long to try to ship what is spooled
# Every call is bounded; a blocking query gets its wait on top of this.
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class Backoff:
    """Capped exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling
    from `first` to `cap`. Pure: the random source is an argument."""

    def __init__(
        self,
        first: float = BACKOFF_FIRST,
        cap: float = BACKOFF_CAP,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.first, self.cap, self.rand = first, cap, rand
        self.failures = 0

    def next(self) -> float:
        d: float = min(self.cap, self.first * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return d / 2 + self.rand() * d / 2

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True, slots=True)
class RouteInfo:
    service: str
    protocol: str
    listen: str
    upstream: str


class _Refused(Exception):
    """The control plane answered, but not with what was asked for."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        try:
            body = response.json()
            text = f"{body.get('error')}: {body.get('detail')}"
        except (ValueError, AttributeError):
            text = response.text[:200]
        super().__init__(f"HTTP {self.status} ({text})")


class ControlClient:
    """One sidecar's link to the control plane."""

    def __init__(
        self,
        config: ControlConfig,
        *,
        app: str,
        instance: str,
        spool: Spool,
        routes: Callable[[], list[RouteInfo]],
        on_policies: Callable[[Engine, int], None],
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        initial_wait: float = INITIAL_WAIT,
    ) -> None:
        self.config = config
        self.app, self.instance = app, instance
        self.spool = spool
        self.routes = routes
        self.on_policies = on_policies
        self.heartbeat_interval = heartbeat_interval
        self.initial_wait = initial_wait
        self.store = PolicyStore(config.state_dir)
        self.current = make_set(0, {})  # the set enforced
        self.engine = Engine(())
        self.from_disk = False  # enforcing the stored last good set
        self.rejected: PolicySet | None = None  # the newest set we could not load
        self.reachable = False
        self._warned = False
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._answered = asyncio.Event()
        stored = self.store.load()
        if stored is not None:
            self.current, self.engine = stored
            self.from_disk = True
            log.info("enforcing the last good policy set, version %d, from disk", self.version)

    @property
    def version(self) -> int:
        """The version of the policy set in force (0: none applied yet)."""
        return self.current.version

    # lifecycle

    async def start(self) -> None:
        """Start watching policies; without a last good set, wait (bounded) for the first."""
        self._client = httpx.AsyncClient(
            base_url=self.config.url,
            headers={"Authorization": f"Bearer {self.config.token}"},
            timeout=TIMEOUT,
        )
        self._spawn(self._policy_loop)
        if not self.from_disk:
            try:
                await asyncio.wait_for(self._answered.wait(), self.initial_wait)
            except TimeoutError:
                log.warning(
                    "control plane %s unreachable and no last good policy set in %s: "
                    "starting with version 0 (no policies) until it answers",
                    self.config.url,
                    self.config.state_dir,
                )

    def start_reporting(self) -> None:
        """Start heartbeats and audit shipping (once the listeners are bound)."""
        self._spawn(self._heartbeat_loop)
        self._spawn(self._ship_loop)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._client is not None:
            self.spool.flush()
            try:
                if not self.reachable:  # do not hold up a shutdown on a dead address
                    raise TimeoutError
                await asyncio.wait_for(self._ship_all(), FINAL_SHIP)
            except (TimeoutError, httpx.HTTPError, _Refused):
                log.info("%d audit events stay spooled for the next start", self.spool.pending)
            await self._client.aclose()
            self._client = None

    def _spawn(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._tasks.append(asyncio.create_task(self._guard(loop)))

    async def _guard(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a loop for good: a bug or an unexpected error (say, an unreadable spool
        segment) is logged and the loop restarted after a backoff, never left dead."""
        backoff = Backoff()
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control-plane loop %s failed; restarting it", loop.__name__)
                await asyncio.sleep(backoff.next())

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "ControlClient.start() first"
        return self._client

    # policies

    async def _policy_loop(self) -> None:
        backoff = Backoff()
        index: int | None = None
        while True:
            try:
                answer = await self._fetch_policies(index)
            except (httpx.HTTPError, _Refused, ValueError, KeyError, TypeError) as exc:
                self._unreachable("policy watch", exc)
                await asyncio.sleep(backoff.next())
                continue
            self._reached()
            backoff.reset()
            self.apply(answer)
            index = answer.version
            self._answered.set()

    async def _fetch_policies(self, index: int | None) -> PolicySet:
        # The first call has no index: it answers at once with the current set.
        params = {} if index is None else {"index": str(index), "wait": f"{POLICY_WAIT}s"}
        timeout = TIMEOUT if index is None else httpx.Timeout(POLICY_WAIT + 10.0, connect=5.0)
        response = await self.client.get("/v1/sidecar/policies", params=params, timeout=timeout)
        if response.status_code != 200:
            raise _Refused(response)
        body = response.json()
        files = body["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise TypeError("policy answer: files must map names to texts")
        return make_set(int(body["version"]), files)

    def apply(self, policy_set: PolicySet) -> bool:
        """Enforce `policy_set` if it is new and loads; returns whether it is now in force.
        Sets are compared whole, not by version alone: a control plane started afresh
        numbers its sets from 1 again."""
        if policy_set == self.current:
            self.from_disk = False
            return False
        if policy_set == self.rejected:
            return False
        try:
            engine = check_set(policy_set)
        except PolicyError as exc:
            self.rejected = policy_set
            log.error(
                "policy set version %d rejected; still enforcing version %d:\n%s",
                policy_set.version,
                self.version,
                exc,
            )
            return False
        try:
            self.store.save(policy_set)
        except OSError as exc:  # enforce it anyway; only a restart would miss it
            log.error("cannot store policy version %d as last good: %s", policy_set.version, exc)
        self.engine, self.current, self.from_disk = engine, policy_set, False
        self.rejected = None
        self.on_policies(engine, policy_set.version)
        rules = sum(len(p.rules) for p in engine.policies)
        log.info(
            "policies version %d in force: %d policies, %d rules",
            self.version,
            len(engine.policies),
            rules,
        )
        return True

    # heartbeat

    def registration(self) -> dict[str, object]:
        return {
            "app": self.app,
            "instance": self.instance,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "routes": [
                {
                    "service": r.service,
                    "protocol": r.protocol,
                    "listen": r.listen,
                    "upstream": r.upstream,
                }
                for r in self.routes()
            ],
            "policy_version": self.version,
            "audit": {"spooled": self.spool.spooled, "dropped": self.spool.dropped},
        }

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff()
        path = f"/v1/sidecars/{quote(self.instance, safe='')}"
        while True:
            try:
                response = await self.client.put(path, json=self.registration())
                if response.status_code != 200:
                    raise _Refused(response)
                interval = response.json().get("heartbeat_interval", self.heartbeat_interval)
                delay = min(max(float(interval), 1.0), 60.0)
                backoff.reset()
                self._reached()
            except (httpx.HTTPError, _Refused, ValueError, TypeError, AttributeError) as exc:
                self._unreachable("heartbeat", exc)
                delay = min(backoff.next(), self.heartbeat_interval)
            await asyncio.sleep(delay)

    # audit shipping

    async def _ship_loop(self) -> None:
        backoff = Backoff()
        limit = BATCH_EVENTS
        while True:
            batch = self.spool.read_batch(limit)
            if batch is None:
                await asyncio.sleep(SHIP_IDLE)
                continue
            try:
                await self._ship(batch)
            except _Refused as exc:
                if exc.status in (400, 413, 422) and len(batch.lines) > 1:
                    limit = max(1, len(batch.lines) // 2)  # find the event it refuses
                    continue
                if exc.status in (400, 413, 422):
                    log.error("control plane refused an audit event for good: %s", exc)
                    self.spool.reject(batch)
                    continue
                self._unreachable("audit shipping", exc)
                await asyncio.sleep(backoff.next())
                continue
            except httpx.HTTPError as exc:
                self._unreachable("audit shipping", exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            limit = BATCH_EVENTS

    async def _ship(self, batch: Batch) -> None:
        response = await self.client.post(
            "/v1/audit/events",
            content=batch.body(),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code != 200:
            raise _Refused(response)
        self.spool.ack(batch)
        self._reached()

    async def _ship_all(self) -> None:
        while (batch := self.spool.read_batch(BATCH_EVENTS)) is not None:
            await self._ship(batch)

    # reachability, logged on change only (a dead control plane must not flood the log)

    def _unreachable(self, what: str, exc: BaseException) -> None:
        if self.reachable or not self._warned:
            self._warned = True
            log.warning(
                "control plane %s: %s failed (%s); enforcing policy version %d, "
                "retrying with backoff",
                self.config.url,
                what,
                str(exc) or type(exc).__name__,
                self.version,
            )
        self.reachable = False

    def _reached(self) -> None:
        if not self.reachable:
            log.info("control plane %s reachable", self.config.url)
        self.reachable = True
