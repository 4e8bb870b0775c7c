"""`sluice up`: open the stores, make the first admin token, apply --policies, serve the API.

Runs uvicorn in-process on uvloop, on a socket bound here (so a busy port is a clear error
before anything starts, and port 0 works). Ctrl-C or SIGTERM ends blocking queries and live
streams at once, lets in-flight requests finish, closes the database and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from importlib import metadata
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mesh.api import Settings, create_app, shutdown
from mesh.api.params import parse_duration
from mesh.policy_files import read_policy_set
from mesh.store import Stores
from policies.errors import PolicyError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
ADMIN_TOKEN_FILE = "admin.token"
# In-flight requests get this long after Ctrl-C; blocking queries and streams end at once.
GRACEFUL_SECONDS = 5


def main(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen)
        retention = parse_duration(args.audit_retention, "--audit-retention")
    except ValueError as exc:
        print(f"sluice up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    data_dir = Path(args.data_dir).resolve()
    try:
        stores = Stores.open(data_dir, args.heartbeat_interval)
    except (OSError, RuntimeError, Exception) as exc:  # sqlite3.Error included
        print(f"sluice up: cannot open {data_dir}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return _serve(args, stores, data_dir, host, port, retention)
    finally:
        stores.close()


def _serve(
    args: argparse.Namespace, stores: Stores, data_dir: Path, host: str, port: int, retention: float
) -> int:
    token_line = admin_token(stores, data_dir)
    if args.policies:
        try:
            files = read_policy_set(args.policies)
            if files != stores.policies.current().files:
                stores.policies.apply(files, "sluice up --policies", "sluice up")
        except PolicyError as exc:
            print(f"sluice up: --policies rejected, not starting:\n{exc}", file=sys.stderr)
            return EXIT_INVALID
        except ValueError as exc:
            print(f"sluice up: --policies: {exc}", file=sys.stderr)
            return EXIT_INVALID
    try:
        sock = bind(host, port)
    except OSError as exc:
        print(f"sluice up: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}"
    settings = Settings(
        data_dir=str(data_dir),
        audit_retention=retention,
        retention_interval=args.retention_interval,
        version=_version(),
        quota=getattr(args, "quota", None),
        quota_prefix=getattr(args, "quota_prefix", "sluice:quota:"),
    )
    try:
        app = create_app(stores, settings)
    except ValueError as exc:  # a --quota URL we cannot use
        print(f"sluice up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    dns = _dns(args, app)
    current = stores.policies.current()
    rules = next((v.rules for v in stores.policies.versions() if v.version == current.version), 0)
    print(
        f"sluice up: control API on {url} (OpenAPI: {url}/v1/openapi.json)\n"
        f"  data dir:        {data_dir} (control.db)\n"
        f"  policy version:  {current.version} ({len(current.files)} files, {rules} rules)\n"
        f"  admin token:     {token_line}\n"
        f"  audit retention: {args.audit_retention}\n"
        f"  quota:           {settings.quota or 'in-process'}\n"
        f"  catalog:         Consul API on {url}/v1/ (CONSUL_HTTP_ADDR={url}); DNS {dns}\n"
        "Ctrl-C stops.",
        flush=True,
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    config = uvicorn.Config(
        app,
        loop="uvloop",
        lifespan="on",
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )
    server = _Server(config, app.state.sluice)
    server.run(sockets=[sock])
    print("sluice up: stopped", flush=True)
    return EXIT_OK


def _dns(args: argparse.Namespace, app: FastAPI) -> str:
    """Attach meshdns to the app unless --no-dns; what to print about it."""
    if getattr(args, "no_dns", False):
        return "off (--no-dns)"
    try:
        host, port = parse_listen(args.dns_listen)
    except ValueError as exc:
        return f"off: {str(exc).replace('--listen', '--dns-listen')}"
    from mesh.catalog.dns import attach

    def ready(where: str) -> None:
        shown = where if where.startswith("not") else f"on {where} (udp, tcp)"
        print(f"sluice up: DNS {shown}", flush=True)

    attach(app, host, port, ready)
    return f"{args.dns_listen} (see below)"


def admin_token(stores: Stores, data_dir: Path) -> str:
    """On first start, create the admin token and write it (0600); say where it is."""
    path = data_dir / ADMIN_TOKEN_FILE
    if stores.tokens.empty():
        _token, secret = stores.tokens.create("admin", "admin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.chmod(path, 0o600)
        return f"{secret} (written to {path})"
    if path.is_file():
        return f"in {path}"
    return f"{path} is gone; use an admin token you kept (sluice token create makes more)"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen: expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _version() -> str:
    try:
        return metadata.version("sluice")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _Server(uvicorn.Server):
    """uvicorn's server, but a signal also ends blocking queries and live streams, and the
    process exits 0 afterwards instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: object) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            from mesh.api.state import ApiState

            state = self._state
            assert isinstance(state, ApiState)
            loop.call_soon_threadsafe(lambda: loop.create_task(shutdown(state)))
