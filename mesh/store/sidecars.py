"""The sidecar registry: what each sidecar said in its last heartbeat, and when.

A sidecar registers and heartbeats with the same call (`upsert`); one that has not been
heard from for `STALE_AFTER` heartbeat intervals is listed as stale (kept, not deleted: its
last report says which policy version it enforced).
"""

from __future__ import annotations

import json
import time
from typing import Any

from mesh.store.db import Database

HEARTBEAT_INTERVAL = 10.0
STALE_AFTER = 3


class SidecarRegistry:
    def __init__(self, db: Database, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.db = db
        self.interval = interval

    def upsert(self, instance: str, info: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        text = json.dumps({**info, "instance": instance}, separators=(",", ":"), allow_nan=False)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO sidecars VALUES (?, ?, ?, ?) ON CONFLICT (instance) "
                "DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen",
                (instance, text, now, now),
            )

    def sidecars(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every sidecar ever registered, by instance, with `last_seen` and `stale`."""
        now = time.time() if now is None else now
        with self.db.reading() as conn:
            rows = conn.execute(
                "SELECT info, first_seen, last_seen FROM sidecars ORDER BY instance"
            ).fetchall()
        out = []
        for info, first_seen, last_seen in rows:
            entry: dict[str, Any] = json.loads(info)
            entry["first_seen"] = first_seen
            entry["last_seen"] = last_seen
            entry["stale"] = now - last_seen > STALE_AFTER * self.interval
            out.append(entry)
        return out

    def live(self, now: float | None = None) -> int:
        return sum(not s["stale"] for s in self.sidecars(now))
