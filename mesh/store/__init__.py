"""The control plane's state in one SQLite file: policies, audit events, tokens, sidecars.

Synchronous and pure (no asyncio, no sockets): the API calls these stores from worker
threads. `Stores.open(data_dir)` opens them all on `<data-dir>/control.db`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mesh.store.audit import AuditStore
from mesh.store.db import Database
from mesh.store.policies import PolicyStore
from mesh.store.sidecars import HEARTBEAT_INTERVAL, SidecarRegistry
from mesh.store.tokens import TokenStore


@dataclass(frozen=True, slots=True)
class Stores:
    db: Database
    policies: PolicyStore
    audit: AuditStore
    tokens: TokenStore
    sidecars: SidecarRegistry

    @classmethod
    def open(cls, data_dir: str | Path, heartbeat_interval: float = HEARTBEAT_INTERVAL) -> Stores:
        db = Database.open(data_dir)
        return cls(
            db,
            PolicyStore(db),
            AuditStore(db),
            TokenStore(db),
            SidecarRegistry(db, heartbeat_interval),
        )

    def close(self) -> None:
        self.db.close()
