"""`sluice sidecar`: run a sidecar from flags (one route) or a config file (several routes)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

from policies.errors import PolicyError
from sidecar.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RELOAD_INTERVAL,
    PROTOCOLS,
    RECORD_MODES,
    AuditConfig,
    Route,
    SidecarConfig,
    load_config,
    parse_hostport,
)

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sidecar",
        help="run a sidecar in front of a service",
        description="Enforce policies on an app's traffic to one or more services. Give "
        "either -c FILE, or --app, --service, --listen, --upstream and --policies.",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="sidecar config file (YAML)")
    p.add_argument("--app", help="the app this sidecar serves (the source in policies)")
    p.add_argument("--instance", help="this instance of the app (default: APP@HOSTNAME)")
    p.add_argument("--service", help="the destination service name (as in policies)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="postgres")
    p.add_argument("--listen", metavar="HOST:PORT", help="where the app connects")
    p.add_argument("--upstream", metavar="HOST:PORT", help="the real server")
    p.add_argument("--policies", nargs="+", metavar="PATH", help="policy files or directories")
    p.add_argument(
        "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS"
    )
    p.add_argument("--audit-log", metavar="FILE", help="append audit events as JSON lines")
    p.add_argument("--audit", choices=RECORD_MODES, default="all", help="which decisions")
    p.add_argument(
        "--full-statements", action="store_true", help="audit statements with their literals"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        config = _config(args)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from sidecar.server import install_uvloop
    from sidecar.server import run as serve

    install_uvloop()
    try:
        asyncio.run(serve(config))
    except PolicyError as exc:
        print(f"sluice sidecar: policies rejected:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"sluice sidecar: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _config(args: argparse.Namespace) -> SidecarConfig:
    if args.config:
        return load_config(args.config)
    missing = [
        f"--{name}"
        for name in ("app", "service", "listen", "upstream", "policies")
        if not getattr(args, name)
    ]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give -c FILE)")
    route = Route(
        service=args.service,
        protocol=args.protocol,
        listen=parse_hostport(args.listen),
        upstream=parse_hostport(args.upstream),
        connect_timeout=args.connect_timeout,
    )
    return SidecarConfig(
        app=args.app,
        instance=args.instance or f"{args.app}@{socket.gethostname()}",
        policies=tuple(args.policies),
        routes=(route,),
        audit=AuditConfig(args.audit_log, args.audit, args.full_statements),
        reload_interval=DEFAULT_RELOAD_INTERVAL,
    )
