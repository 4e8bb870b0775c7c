"""What a sidecar knows about one request when it asks the engine for a decision.

Protocol code fills these in (decode first); the engine reads only these (then decide).
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.sql.model import StatementInfo


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking and whom they are talking to."""

    source_app: str
    destination: str
    source_instance: str = ""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP request as the decoder normalised it (path without query, dot-segments resolved)."""

    method: str
    path: str
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # lower-case names

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


Request = StatementInfo | HttpRequest
