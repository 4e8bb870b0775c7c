"""`sluice up`: run the control plane (control API, policy store, audit store) in one process.

Only argument parsing lives here, so that `sluice policy check` does not import the web
stack; mesh/up.py does the work.
"""

from __future__ import annotations

import argparse

DEFAULT_LISTEN = "127.0.0.1:8500"
DEFAULT_DATA_DIR = "./sluice-data"
DEFAULT_DNS_LISTEN = "127.0.0.1:8600"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run the control plane",
        description="Run the control plane in one process: the control API, the policy "
        "store and the audit store, with state in --data-dir. Ctrl-C stops it.",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"control API address (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR")
    p.add_argument(
        "--policies",
        nargs="+",
        metavar="PATH",
        help="policy files or directories, applied as a new version if they differ "
        "from the current one",
    )
    p.add_argument(
        "--audit-retention",
        default="30d",
        metavar="DURATION",
        help="delete audit events older than this, hourly (default 30d)",
    )
    p.add_argument(
        "--dns-listen",
        default=DEFAULT_DNS_LISTEN,
        metavar="HOST:PORT",
        help=f"meshdns over the embedded catalog, UDP and TCP (default {DEFAULT_DNS_LISTEN})",
    )
    p.add_argument("--no-dns", action="store_true", help="do not run meshdns")
    p.add_argument(
        "--quota",
        metavar="URL",
        help="where the mesh-wide rate-limit buckets live: in this process (default) or "
        "redis://HOST:PORT/DB, shared by several control planes (docs/operations.md)",
    )
    p.add_argument(
        "--quota-prefix",
        default="sluice:quota:",
        metavar="PREFIX",
        help="Redis key prefix of the quota buckets (default sluice:quota:)",
    )
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    # For tests: short heartbeat and retention intervals.
    p.add_argument("--heartbeat-interval", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--retention-interval", type=float, default=3600.0, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mesh import up

    return up.main(args)
