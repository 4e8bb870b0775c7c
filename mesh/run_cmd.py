"""`sluice run`: the command line and the sidecar configuration it builds.

    sluice run --app billing --control URL --token T --service orders-db -- ./billing
    sluice run --app billing -c billing.yaml --unknown deny -- psql -h orders-db.service.consul

Routes come from `-c FILE` (a sidecar config; its `listen` addresses are not opened, an
app connecting to one is intercepted like any other connection) or from `--service
NAME[:PROTOCOL][=UPSTREAM]` flags (protocol postgres and upstream NAME.service, from the
catalog, unless given). mesh/run.py does the work; only parsing lives here, so that other
commands do not import it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import replace

from sidecar.config import (
    DEFAULT_RELOAD_INTERVAL,
    PROTOCOLS,
    RECORD_MODES,
    AuditConfig,
    ControlConfig,
    Route,
    SidecarConfig,
    check_control_url,
    load_config,
    parse_upstream,
)

DEFAULT_DNS = "127.0.0.1:8600"  # where `sluice up` serves meshdns
DEFAULT_STATE_ROOT = "/var/lib/sluice/run"
UNKNOWN_MODES = ("pass", "deny")  # sidecar/transparent.py
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command with its traffic under policy (transparent mode; needs root)",
        usage="sluice run [--app APP] [-c FILE | --policies PATH... --service SPEC...] "
        "[--control URL --token TOKEN] [options] -- CMD [ARG...]",
        description="Start CMD unchanged in a network namespace of its own, with a sidecar "
        "beside it: every TCP connection it opens is intercepted, mapped to a mesh service "
        "and put under policy; other destinations pass or are denied (--unknown), audited "
        "either way. Exit code, signals and stdio pass through. Needs CAP_NET_ADMIN and "
        "CAP_SYS_ADMIN (root); without them use DNS or explicit mode (docs/operations.md).",
    )
    p.add_argument("--app", help="the app (the source in policies); default: -c FILE's app")
    p.add_argument("--instance", help="this instance of the app (default: APP@HOSTNAME)")
    p.add_argument("-c", "--config", metavar="FILE", help="sidecar config file (routes, audit)")
    p.add_argument("--policies", nargs="+", metavar="PATH", help="policy files or directories")
    p.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME[:PROTOCOL][=UPSTREAM]",
        help=f"a route: protocol {'|'.join(PROTOCOLS)} (default postgres), upstream "
        "HOST:PORT or [TAG.]NAME.service (default NAME.service, from the catalog)",
    )
    p.add_argument("--control", metavar="URL", help="the control plane (sluice up), http://...")
    p.add_argument("--token", metavar="TOKEN", help="sidecar-role token (default: $SLUICE_TOKEN)")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"with --control: last good policies and the audit spool "
        f"(default {DEFAULT_STATE_ROOT}/INSTANCE)",
    )
    p.add_argument(
        "--unknown",
        choices=UNKNOWN_MODES,
        default="pass",
        help="TCP to destinations that are not mesh services: relayed (pass, the default) "
        "or reset (deny); audited either way",
    )
    p.add_argument(
        "--dns",
        default=DEFAULT_DNS,
        metavar="HOST:PORT",
        help=f"meshdns, for names in --dns-domain (default {DEFAULT_DNS}, sluice up's); "
        "other names go to the host's resolvers",
    )
    p.add_argument("--dns-domain", default="consul", metavar="DOMAIN")
    p.add_argument("--user", help="run CMD as this user (name or uid) instead of root")
    p.add_argument("--audit-log", metavar="FILE", help="append audit events as JSON lines")
    p.add_argument("--audit", choices=RECORD_MODES, default="all", help="which decisions")
    p.add_argument(
        "--full-statements", action="store_true", help="audit statements with their literals"
    )
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mesh import run as run_app

    return run_app.main(args)


def parse_service(text: str) -> Route:
    """NAME[:PROTOCOL][=UPSTREAM] -> a route without a listener of its own."""
    head, sep, upstream = text.partition("=")
    name, _, protocol = head.partition(":")
    if not _NAME.match(name):
        raise ValueError(f"--service: expected NAME[:PROTOCOL][=UPSTREAM], got {text!r}")
    protocol = protocol or "postgres"
    if protocol not in PROTOCOLS:
        raise ValueError(f"--service {name}: protocol must be one of {', '.join(PROTOCOLS)}")
    if sep and not upstream:
        raise ValueError(f"--service {name}: empty upstream after '='")
    try:
        address, service = parse_upstream(upstream or f"{name}.service")
    except ValueError as exc:
        raise ValueError(f"--service {name}: {exc}") from None
    return Route(name, protocol, ("127.0.0.1", 0), address, upstream_service=service)


def build_config(args: argparse.Namespace) -> SidecarConfig:
    """The sidecar's configuration from the flags; raises ValueError (or PolicyError for a
    config file) saying what is wrong."""
    if args.config:
        if args.service or args.policies:
            raise ValueError("-c FILE holds the routes and policies: no --service or --policies")
        base = load_config(args.config)
    else:
        if not args.app:
            raise ValueError("missing --app (or give -c FILE)")
        routes = tuple(parse_service(s) for s in args.service)
        names = [r.service for r in routes]
        if len(set(names)) != len(names):
            raise ValueError("--service: each service once")
        base = SidecarConfig(
            app=args.app,
            instance=args.app,
            policies=tuple(args.policies or ()),
            routes=routes,
            audit=AuditConfig(args.audit_log, args.audit, args.full_statements),
            reload_interval=DEFAULT_RELOAD_INTERVAL,
        )
    app = args.app or base.app
    instance = args.instance or f"{app}@{socket.gethostname()}"
    control = base.control
    if args.control:
        token = args.token or os.environ.get("SLUICE_TOKEN", "")
        if not token:
            raise ValueError("--control needs --token (or SLUICE_TOKEN in the environment)")
        state = args.state_dir or os.path.join(DEFAULT_STATE_ROOT, instance.replace("/", "_"))
        control = ControlConfig(check_control_url(args.control), token, state)
    elif args.token or args.state_dir:
        raise ValueError("--token and --state-dir go with --control")
    if control is None and base.routes and not base.policies:
        raise ValueError("missing --policies (or --control, or -c FILE) for the routes")
    return replace(base, app=app, instance=instance, control=control)
