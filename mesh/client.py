"""The CLI's client of the control API: where it is, which token, and what errors mean.

The address comes from `--control` or `SLUICE_CONTROL` (default http://127.0.0.1:8500); the
token from `--token`, `SLUICE_TOKEN`, or `<data-dir>/admin.token` (the file `sluice up`
writes). Errors come back as `ControlError` carrying the API's {"error", "detail"}; a
control plane that cannot be reached is `Unreachable`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_CONTROL = "http://127.0.0.1:8500"
DEFAULT_DATA_DIR = "./sluice-data"
TIMEOUT = 30.0


class Unreachable(Exception):
    def __init__(self, url: str, why: object) -> None:
        super().__init__(f"cannot reach the control plane at {url}: {why}")


class ControlError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.error = str(body.get("error", "error"))
        self.detail = str(body.get("detail", ""))
        self.problems: list[dict[str, Any]] = list(body.get("problems") or [])
        super().__init__(f"{status} {self.error}: {self.detail}")


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("control plane")
    g.add_argument(
        "--control",
        default=os.environ.get("SLUICE_CONTROL", DEFAULT_CONTROL),
        metavar="URL",
        help="control API address (env SLUICE_CONTROL; default %(default)s)",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("SLUICE_TOKEN"),
        help="bearer token (env SLUICE_TOKEN; default: the admin token in --data-dir)",
    )
    g.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help="where `sluice up` keeps admin.token (default %(default)s)",
    )


class Control:
    def __init__(self, url: str, token: str | None, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Control:
        token = args.token
        if not token:
            path = Path(args.data_dir) / "admin.token"
            try:
                token = path.read_text(encoding="utf-8").strip()
            except OSError:
                token = None
        return cls(args.control, token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        body: object = None,
    ) -> Any:
        try:
            r = self._http.request(method, path, params=_clean(params), json=body)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, exc) from None
        return _answer(r)

    def lines(self, path: str, params: dict[str, Any] | None = None) -> Iterator[str]:
        """The response body line by line, for as long as the server sends (SSE, NDJSON)."""
        try:
            with self._http.stream(
                "GET", path, params=_clean(params), timeout=httpx.Timeout(TIMEOUT, read=None)
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    _answer(r)
                yield from r.iter_lines()
        except httpx.TransportError as exc:
            raise Unreachable(self.url, exc) from None


def _clean(params: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if params is None else {k: v for k, v in params.items() if v is not None}


def _answer(r: httpx.Response) -> Any:
    try:
        body = r.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {"error": "bad answer", "detail": r.text[:200]}
    if r.status_code >= 400:
        raise ControlError(r.status_code, body if isinstance(body, dict) else {})
    return body
