"""API tokens: random bearer secrets with one role each, stored only as SHA-256 hashes.

A token is shown once, when it is created. `verify` answers from an in-memory map of
hash -> Token that this store keeps in step with every change it makes (the control plane
is the only writer of control.db), so authenticating a request never touches SQLite.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from mesh.store.db import Database

ROLES = ("admin", "sidecar", "reader")
PREFIX = "sluice_"
MAX_NAME = 128


class LastAdmin(Exception):
    """Deleting this token would leave no admin token: nobody could manage the mesh."""


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    name: str
    role: str
    created: float

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "role": self.role, "created": self.created}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        with db.reading() as conn:
            rows = conn.execute("SELECT id, name, role, created, hash FROM tokens").fetchall()
        self._by_hash = {h: Token(i, n, r, c) for i, n, r, c, h in rows}

    def create(self, role: str, name: str) -> tuple[Token, str]:
        """A new token of `role`; returns it with the secret (never stored in clear)."""
        if role not in ROLES:
            raise ValueError(f"role: unknown {role!r}; expected one of {', '.join(ROLES)}")
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"name: expected 1 to {MAX_NAME} printable characters")
        secret = PREFIX + secrets.token_urlsafe(32)
        token = Token("tok_" + secrets.token_hex(6), name, role, time.time())
        digest = hash_token(secret)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                (token.id, token.name, token.role, digest, token.created),
            )
        with self._lock:
            self._by_hash[digest] = token
        return token, secret

    def verify(self, secret: str) -> Token | None:
        """The token with this secret, or None."""
        return self._by_hash.get(hash_token(secret))

    def tokens(self) -> list[Token]:
        with self._lock:
            return sorted(self._by_hash.values(), key=lambda t: (t.created, t.id))

    def delete(self, token_id: str) -> bool:
        """Delete a token (False if unknown); LastAdmin if it is the only admin token."""
        with self._lock:
            found = [(h, t) for h, t in self._by_hash.items() if t.id == token_id]
            if not found:
                return False
            digest, token = found[0]
            admins = sum(t.role == "admin" for t in self._by_hash.values())
            if token.role == "admin" and admins == 1:
                raise LastAdmin(f"{token_id} is the only admin token; create another first")
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM tokens WHERE id = ?", (token_id,))
            del self._by_hash[digest]
        return True

    def empty(self) -> bool:
        return not self._by_hash
