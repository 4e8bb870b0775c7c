"""The embedded catalog's state: one node, its services and checks, the KV store, indexes.

Pure: no asyncio, no sockets, no clock of its own (`now` is an argument). Callers (the
routes, the check runner) mutate it on the event loop only, so it needs no lock; the
answers it builds are plain JSON values in Consul's documented shapes.

Indexes, as Consul's blocking queries need them
(developer.hashicorp.com/consul/api-docs/features/blocking): `index` counts every write
(Consul's Raft index); each query family has its own index, the value of `index` at its
last change, so a blocking query wakes only when what it reads may have changed:

- `services_index`: the set of services, their registrations (catalog endpoints)
- `service_index(name)`: one service's registrations and the status of its checks
  (/v1/health/service/NAME); an unknown name has `services_index`, which moves when
  the service goes away, so an index never goes backwards for a watcher
- `kv_index`: any KV write

A check's status counts as a change only when it differs (a TTL pass that keeps a
passing check passing moves nothing), as Consul's anti-entropy does for status.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from mesh.catalog.parse import CheckSpec, ServiceSpec

HEALTH_ORDER = {"passing": 0, "warning": 1, "critical": 2}
SERF_CHECK = "serfHealth"
MAX_KV_VALUE = 512 * 1024  # Consul's limit for one value


@dataclass(slots=True)
class Check:
    spec: CheckSpec
    service_id: str
    status: str
    output: str = ""
    create_index: int = 0
    modify_index: int = 0
    deadline: float = 0.0  # TTL checks: when the status turns critical without an update
    critical_since: float | None = None


@dataclass(slots=True)
class Service:
    spec: ServiceSpec
    create_index: int
    modify_index: int
    check_ids: tuple[str, ...] = ()


@dataclass(slots=True)
class KvEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, Any]:
        return {
            "LockIndex": 0,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode() if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class UnknownCheck(KeyError):
    pass


class NotTtl(ValueError):
    pass


@dataclass
class Model:
    node: str
    node_address: str
    node_id: str
    datacenter: str = "dc1"
    index: int = 1
    services_index: int = 1
    kv_index: int = 1
    services: dict[str, Service] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    kv: dict[str, KvEntry] = field(default_factory=dict)
    _service_index: dict[str, int] = field(default_factory=dict)

    # -- writes ---------------------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def register(self, spec: ServiceSpec, now: float) -> None:
        """Add or replace a service instance with its checks (PUT /agent/service/register).
        A check that keeps its ID and type keeps its status; new checks start at theirs."""
        i = self._bump()
        old = self.services.get(spec.service_id)
        if old is not None and old.spec.name.lower() != spec.name.lower():
            self._drop_service(old)  # the same ID, renamed: the old name loses an instance
            old = None
        kept: dict[str, Check] = {}
        if old is not None:
            for cid in old.check_ids:
                check = self.checks.pop(cid, None)
                if check is not None:
                    kept[cid] = check
        for c in spec.checks:
            prev = kept.get(c.check_id)
            if prev is not None and prev.spec.kind == c.kind:
                prev.spec = c
                self.checks[c.check_id] = prev
                continue
            self.checks[c.check_id] = Check(
                c, spec.service_id, c.status, "", i, i, now + c.ttl if c.kind == "ttl" else 0.0
            )
        created = old.create_index if old is not None else i
        self.services[spec.service_id] = Service(
            spec, created, i, tuple(c.check_id for c in spec.checks)
        )
        self.services_index = i
        self._service_index[spec.name.lower()] = i

    def deregister(self, service_id: str) -> bool:
        svc = self.services.get(service_id)
        if svc is None:
            return False
        self._drop_service(svc)
        return True

    def _drop_service(self, svc: Service) -> None:
        i = self._bump()
        del self.services[svc.spec.service_id]
        for cid in svc.check_ids:
            self.checks.pop(cid, None)
        self.services_index = i
        key = svc.spec.name.lower()
        if any(s.spec.name.lower() == key for s in self.services.values()):
            self._service_index[key] = i
        else:
            self._service_index.pop(key, None)

    def update_ttl(self, check_id: str, status: str, output: str, now: float) -> bool:
        """PUT /agent/check/pass|warn|fail/:id: set a TTL check's status and restart its TTL.
        Raises UnknownCheck or NotTtl; returns whether the status changed."""
        check = self.checks.get(check_id)
        if check is None:
            raise UnknownCheck(check_id)
        if check.spec.kind != "ttl":
            raise NotTtl(check_id)
        check.deadline = now + check.spec.ttl
        return self.set_status(check, status, output, now)

    def set_status(self, check: Check, status: str, output: str, now: float) -> bool:
        """Record a check's result; indexes move only when the status changes."""
        check.output = output
        if status == check.status:
            return False
        check.status = status
        check.critical_since = now if status == "critical" else None
        i = self._bump()
        check.modify_index = i
        svc = self.services.get(check.service_id)
        if svc is not None:
            self._service_index[svc.spec.name.lower()] = i
        return True

    def expire(self, now: float) -> bool:
        """TTL checks past their deadline turn critical; services critical for longer than
        their DeregisterCriticalServiceAfter are removed. Returns whether anything changed."""
        changed = False
        for check in list(self.checks.values()):
            if check.spec.kind == "ttl" and check.status != "critical" and now >= check.deadline:
                why = f"TTL expired (no update for {check.spec.ttl:g}s)"
                changed |= self.set_status(check, "critical", why, now)
        for check in list(self.checks.values()):
            after = check.spec.deregister_after
            since = check.critical_since
            if after and since is not None and now - since >= after:
                changed |= self.deregister(check.service_id)
        return changed

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        """PUT /kv/:key; with `cas`, only if the key's ModifyIndex equals it (0: only if the
        key does not exist). Returns whether it was written."""
        old = self.kv.get(key)
        if cas is not None and (old.modify_index if old is not None else 0) != cas:
            return False
        i = self._bump()
        self.kv[key] = KvEntry(key, value, flags, old.create_index if old else i, i)
        self.kv_index = i
        return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        if recurse:
            gone = [k for k in self.kv if k.startswith(key)]
        else:
            old = self.kv.get(key)
            if cas is not None and (old.modify_index if old is not None else 0) != cas:
                return False
            gone = [key] if old is not None else []
        for k in gone:
            del self.kv[k]
        self.kv_index = self._bump()  # Consul moves the index for a delete of nothing too
        return True

    # -- reads ----------------------------------------------------------------------------

    def service_index(self, name: str) -> int:
        return self._service_index.get(name.lower(), self.services_index)

    def instances(self, name: str) -> list[Service]:
        key = name.lower()
        return sorted(
            (s for s in self.services.values() if s.spec.name.lower() == key),
            key=lambda s: s.spec.service_id,
        )

    def node_json(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
            "Meta": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def catalog_services(self) -> dict[str, list[str]]:
        out: dict[str, set[str]] = {}
        for s in self.services.values():
            out.setdefault(s.spec.name, set()).update(s.spec.tags)
        return {name: sorted(tags) for name, tags in sorted(out.items())}

    def catalog_service(self, name: str, tags: list[str]) -> list[dict[str, Any]]:
        out = []
        for s in self.instances(name):
            if not _has_tags(s, tags):
                continue
            spec = s.spec
            out.append(
                {
                    "ID": self.node_id,
                    "Node": self.node,
                    "Address": self.node_address,
                    "Datacenter": self.datacenter,
                    "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
                    "NodeMeta": {},
                    "ServiceKind": "",
                    "ServiceID": spec.service_id,
                    "ServiceName": spec.name,
                    "ServiceTags": list(spec.tags),
                    "ServiceAddress": spec.address,
                    "ServiceWeights": _weights(spec),
                    "ServiceMeta": dict(spec.meta),
                    "ServicePort": spec.port,
                    "ServiceEnableTagOverride": spec.enable_tag_override,
                    "ServiceProxy": {},
                    "ServiceConnect": {},
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                }
            )
        return out

    def health_service(self, name: str, passing: bool, tags: list[str]) -> list[dict[str, Any]]:
        out = []
        for s in self.instances(name):
            if not _has_tags(s, tags):
                continue
            checks = [self.serf_check_json()] + [
                self.check_json(self.checks[c]) for c in s.check_ids if c in self.checks
            ]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            entry = {"Node": self.node_json(), "Service": self.service_json(s), "Checks": checks}
            out.append(entry)
        return out

    def health(self, s: Service) -> str:
        """The worst status among the instance's checks (the node's included)."""
        statuses = [self.checks[c].status for c in s.check_ids if c in self.checks]
        return max(statuses, key=HEALTH_ORDER.__getitem__, default="passing")

    def service_json(self, s: Service, agent: bool = False) -> dict[str, Any]:
        spec = s.spec
        out: dict[str, Any] = {
            "ID": spec.service_id,
            "Service": spec.name,
            "Tags": list(spec.tags),
            "Address": spec.address,
            "Meta": dict(spec.meta),
            "Port": spec.port,
            "Weights": _weights(spec),
            "EnableTagOverride": spec.enable_tag_override,
        }
        if agent:
            out["Datacenter"] = self.datacenter
        else:
            out.update(Proxy={}, Connect={}, CreateIndex=s.create_index, ModifyIndex=s.modify_index)
        return out

    def check_json(self, check: Check, agent: bool = False) -> dict[str, Any]:
        svc = self.services.get(check.service_id)
        out: dict[str, Any] = {
            "Node": self.node,
            "CheckID": check.spec.check_id,
            "Name": check.spec.name,
            "Status": check.status,
            "Notes": check.spec.notes,
            "Output": check.output,
            "ServiceID": check.service_id,
            "ServiceName": svc.spec.name if svc else "",
            "ServiceTags": list(svc.spec.tags) if svc else [],
            "Type": check.spec.kind,
            "Definition": {},
        }
        if not agent:
            out.update(CreateIndex=check.create_index, ModifyIndex=check.modify_index)
        return out

    def serf_check_json(self) -> dict[str, Any]:
        """The node's own check: this process answers, so the node is alive."""
        return {
            "Node": self.node,
            "CheckID": SERF_CHECK,
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": {},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def node_services(self, name: str) -> dict[str, Any] | None:
        if name.lower() != self.node.lower():
            return None
        return {
            "Node": self.node_json(),
            "Services": {
                s.spec.service_id: self.service_json(s)
                for s in sorted(self.services.values(), key=lambda s: s.spec.service_id)
            },
        }

    def kv_get(self, key: str, recurse: bool) -> list[KvEntry]:
        if recurse:
            return [self.kv[k] for k in sorted(self.kv) if k.startswith(key)]
        entry = self.kv.get(key)
        return [entry] if entry is not None else []

    def kv_keys(self, prefix: str, separator: str) -> list[str]:
        out: set[str] = set()
        for k in self.kv:
            if not k.startswith(prefix):
                continue
            if separator:
                cut = k.find(separator, len(prefix))
                if cut >= 0:
                    k = k[: cut + len(separator)]
            out.add(k)
        return sorted(out)


def _has_tags(s: Service, tags: list[str]) -> bool:
    have = {t.casefold() for t in s.spec.tags}
    return all(t.casefold() in have for t in tags)


def _weights(spec: ServiceSpec) -> dict[str, int]:
    return {"Passing": spec.weights[0], "Warning": spec.weights[1]}
