"""`sluice dns`: run meshdns standalone, answering from a catalog file or a Consul agent.

    sluice dns --listen 127.0.0.1:8600 --catalog-file catalog.yaml --recursor 1.1.1.1:53
    sluice dns --consul http://127.0.0.1:8500 --vip orders-db=127.0.0.10:5432
    sluice dns --consul http://127.0.0.1:8500 --vip-from-catalog billing

Prints where it listens on stdout once both sockets are bound; Ctrl-C stops it and prints
the counters on stderr. See meshdns/README.md for names, VIPs and resolver setup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable

from meshdns.answer import Answerer, Vip
from meshdns.catalog import Catalog, CatalogError, StaticCatalog
from meshdns.forward import DEFAULT_TIMEOUT, Forwarder
from meshdns.server import DnsServer, ServerConfig, serve

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
# Catalog threads (blocking queries and their JSON, a catalog file's reload) hold the GIL
# for at most this long before the loop gets it back (Python's default: 5 ms).
SWITCH_INTERVAL = 0.001


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dns",
        help="serve service discovery over DNS (Consul semantics)",
        description="Answer NAME.service.consul, _NAME._TAG.service.consul (SRV) and "
        "NODE.node.consul from a catalog file or a Consul agent; forward other names.",
    )
    p.add_argument("--listen", default="127.0.0.1:8600", metavar="HOST:PORT", help="UDP and TCP")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalog-file", metavar="FILE", help="YAML catalog, reloaded on change")
    src.add_argument("--consul", metavar="URL", help="a Consul HTTP API (e.g. $CONSUL_HTTP_ADDR)")
    p.add_argument("--domain", default="consul", help="the zone answered (default: consul)")
    p.add_argument("--datacenter", default="dc1", help="with --consul: the local datacenter")
    p.add_argument("--ttl", type=int, default=0, metavar="SECONDS", help="answer TTL (default 0)")
    p.add_argument("--only-passing", action="store_true", help="leave out 'warning' instances")
    p.add_argument(
        "--recursor", action="append", default=[], metavar="HOST:PORT", help="for other names"
    )
    p.add_argument("--forward-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS")
    p.add_argument(
        "--vip", action="append", default=[], metavar="NAME=IP[:PORT]", help="DNS-VIP mode"
    )
    p.add_argument(
        "--vip-from-catalog",
        metavar="APP",
        help="DNS-VIP mode: answer each service APP's sidecar has a route for with the "
        "route's listener, as the sidecar registered it (service APP-sidecar)",
    )
    p.add_argument(
        "--vip-instance",
        metavar="INSTANCE",
        help="with --vip-from-catalog: only that sidecar instance's listeners",
    )
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        host, port = parse_hostport(args.listen)
        recursors = [parse_hostport(r) for r in args.recursor]
        vips = dict(parse_vip(v) for v in args.vip)
        if not 0 <= args.ttl <= 2**31 - 1:
            raise ValueError("--ttl must be 0 or more seconds")
        if args.vip_instance and not args.vip_from_catalog:
            raise ValueError("--vip-instance needs --vip-from-catalog")
    except ValueError as exc:
        print(f"sluice dns: {exc}", file=sys.stderr)
        return EXIT_USAGE
    catalog: Catalog
    try:
        if args.catalog_file:
            catalog = StaticCatalog(args.catalog_file)
        else:
            from meshdns.consul_catalog import ConsulCatalog

            catalog = ConsulCatalog(args.consul, datacenter=args.datacenter)
    except (CatalogError, OSError) as exc:
        print(f"sluice dns: {exc}", file=sys.stderr)
        return EXIT_INVALID
    answerer = Answerer(
        catalog,
        domain=args.domain,
        ttl=args.ttl,
        vips=vips,
        vip_app=args.vip_from_catalog,
        vip_instance=args.vip_instance,
        recursion=bool(recursors),
        only_passing=args.only_passing,
    )
    forwarder = Forwarder(recursors, timeout=args.forward_timeout) if recursors else None
    servers: list[DnsServer] = []

    def ready(server: DnsServer) -> None:
        servers.append(server)
        # What start-up allocated (modules, the catalog) lives as long as the process: out of
        # the collector's sight, a full collection no longer walks it (~45 ms here, on the
        # loop, with the `sluice` command's imports).
        gc.collect()
        gc.freeze()
        print(
            f"meshdns listening on {host}:{server.port} (udp, tcp); "
            f"domain {answerer.domain}; {len(recursors)} recursor(s)",
            flush=True,
        )

    async def main() -> None:
        # SIGTERM stops like Ctrl-C: sockets closed, counters printed.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(answerer, ServerConfig(host, port), forwarder, ready)

    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"sluice dns: {exc}", file=sys.stderr)
        return EXIT_INVALID
    finally:
        catalog.close()
    for server in servers:
        counters = " ".join(f"{k}={v}" for k, v in server.counters().items() if v)
        print(f"meshdns stopped: {counters or 'no queries'}", file=sys.stderr)
    return EXIT_OK


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is the fallback
        return None
    return uvloop.new_event_loop


def parse_hostport(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_vip(text: str) -> tuple[str, Vip]:
    """NAME=IP or NAME=IP:PORT (the port is what SRV answers carry)."""
    name, sep, value = text.partition("=")
    if not sep or not name or "." in name:
        raise ValueError(f"--vip expects NAME=IP[:PORT], got {text!r}")
    address, vport = value, None
    if value.count(":") == 1 or value.startswith("["):
        address, port = parse_hostport(value)
        vport = port
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"--vip {name}: {address!r} is not an IP address") from None
    return name.lower(), Vip(address, vport)
