"""`sluice sidecar`: run a sidecar from flags (one route) or a config file (several routes).

With `--control URL --token TOKEN --state-dir DIR` the sidecar takes its policies from the
control plane (`--policies` is then optional, and ignored with a warning when given) and
ships its audit events there through a spool in DIR. The token may come from the
SLUICE_TOKEN environment variable instead, to keep it out of process listings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from dataclasses import replace

from policies.errors import PolicyError
from sidecar.config import (
    BALANCES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RELOAD_INTERVAL,
    DEFAULT_TRACE_SAMPLE,
    PROTOCOLS,
    RECORD_MODES,
    AuditConfig,
    ControlConfig,
    Route,
    SidecarConfig,
    check_control_url,
    check_sample,
    load_config,
    parse_hostport,
    parse_upstream,
)

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sidecar",
        help="run a sidecar in front of a service",
        description="Enforce policies on an app's traffic to one or more services. Give "
        "either -c FILE, or --app, --service, --listen, --upstream and --policies (or "
        "--control, --token and --state-dir to take policies from the control plane).",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="sidecar config file (YAML)")
    p.add_argument("--app", help="the app this sidecar serves (the source in policies)")
    p.add_argument("--instance", help="this instance of the app (default: APP@HOSTNAME)")
    p.add_argument("--service", help="the destination service name (as in policies)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="postgres")
    p.add_argument("--listen", metavar="HOST:PORT", help="where the app connects")
    p.add_argument(
        "--upstream",
        metavar="HOST:PORT|NAME.service",
        help="the real server, or a service's healthy instances from the catalog",
    )
    p.add_argument(
        "--balance",
        choices=BALANCES,
        default="round-robin",
        help="how a NAME.service upstream spreads connections over its instances",
    )
    p.add_argument("--policies", nargs="+", metavar="PATH", help="policy files or directories")
    p.add_argument(
        "--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS"
    )
    p.add_argument("--audit-log", metavar="FILE", help="append audit events as JSON lines")
    p.add_argument("--audit", choices=RECORD_MODES, default="all", help="which decisions")
    p.add_argument(
        "--full-statements", action="store_true", help="audit statements with their literals"
    )
    p.add_argument("--control", metavar="URL", help="the control plane (sluice up), http://...")
    p.add_argument("--token", metavar="TOKEN", help="sidecar-role token (default: $SLUICE_TOKEN)")
    p.add_argument("--state-dir", metavar="DIR", help="last good policy set and the audit spool")
    p.add_argument(
        "--trace-sample",
        type=float,
        metavar="RATIO",
        help=f"share of recorded statements traced as spans (default {DEFAULT_TRACE_SAMPLE})",
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export spans and metrics over OTLP/HTTP (default: $OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    p.add_argument(
        "--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics at GET /metrics"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    # One INFO line per control-plane request (heartbeats, long polls) drowns the sidecar's.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
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
    config = _base_config(args)
    t = config.telemetry
    # Flags win over the config file's `telemetry:` section.
    try:
        if args.trace_sample is not None:
            t = replace(t, trace_sample=check_sample(args.trace_sample))
        if args.otlp_endpoint:
            t = replace(t, otlp_endpoint=check_control_url(args.otlp_endpoint))
        if args.metrics_listen:
            t = replace(t, metrics_listen=parse_hostport(args.metrics_listen))
    except ValueError as exc:
        raise ValueError(f"telemetry flags: {exc}") from None
    return replace(config, telemetry=t)


def _base_config(args: argparse.Namespace) -> SidecarConfig:
    if args.config:
        return load_config(args.config)
    required = ["app", "service", "listen", "upstream"]
    control = None
    if args.control:
        token = args.token or os.environ.get("SLUICE_TOKEN", "")
        if not token:
            raise ValueError("--control needs --token (or SLUICE_TOKEN in the environment)")
        if not args.state_dir:
            raise ValueError("--control needs --state-dir")
        control = ControlConfig(check_control_url(args.control), token, args.state_dir)
    else:
        required.append("policies")
        if args.token or args.state_dir:
            raise ValueError("--token and --state-dir go with --control")
    missing = [f"--{name.replace('_', '-')}" for name in required if not getattr(args, name)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give -c FILE)")
    upstream, service_upstream = parse_upstream(args.upstream, args.balance)
    route = Route(
        service=args.service,
        protocol=args.protocol,
        listen=parse_hostport(args.listen),
        upstream=upstream,
        connect_timeout=args.connect_timeout,
        upstream_service=service_upstream,
    )
    return SidecarConfig(
        app=args.app,
        instance=args.instance or f"{args.app}@{socket.gethostname()}",
        policies=tuple(args.policies or ()),
        routes=(route,),
        audit=AuditConfig(args.audit_log, args.audit, args.full_statements),
        reload_interval=DEFAULT_RELOAD_INTERVAL,
        control=control,
    )
