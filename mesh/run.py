"""`sluice run`: an unchanged app in its own network namespace, its sidecar beside it.

Order of work (docs/decisions/0009-transparent-interception.md):

1. checks that cost nothing: the capabilities (CAP_NET_ADMIN, CAP_SYS_ADMIN), `ip` and
   `iptables-restore`, the command (not found: 127, not executable: 126, like a shell),
   the sidecar's configuration;
2. under a lock: namespaces left by a `sluice run` killed with SIGKILL are removed, then
   `sluice-<pid>` is made (sidecar/netns.py);
3. the sidecar starts in the host namespace without listeners of its own; the transparent
   listener (sidecar/transparent.py) and the DNS relay (meshdns/relay.py) get sockets made
   inside the namespace; the REDIRECT rules are loaded (sidecar/netfilter.py);
4. the app starts through `ip netns exec` (which bind-mounts the namespace's resolv.conf)
   and `setpriv` (CAP_NET_ADMIN and CAP_SYS_ADMIN dropped, so even a root app cannot
   undo its rules; SIGTERM to it if `sluice run` dies), with our stdin, stdout, stderr;
5. signals are forwarded; when the app exits, the sidecar stops (audit shipped) and the
   namespace is removed; the app's exit code is ours (128+N when a signal N ended it).

`sluice run`'s own failures exit 125 (as `docker run` does), before the app starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import sys

from mesh.run_cmd import build_config
from meshdns.relay import DnsRelay, host_resolvers, resolv_conf
from policies.errors import PolicyError
from sidecar import netfilter, netns
from sidecar.config import SidecarConfig, parse_hostport
from sidecar.server import Sidecar, install_uvloop
from sidecar.spool import SpoolBusy
from sidecar.transparent import TransparentListener

log = logging.getLogger("sluice.run")

EXIT_USAGE, EXIT_SETUP, EXIT_CANNOT_RUN, EXIT_NOT_FOUND = 2, 125, 126, 127
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Sent by a terminal to its whole foreground process group: the app got it already.
TERMINAL = (signal.SIGINT, signal.SIGQUIT)
DROPPED_CAPS = "-net_admin,-sys_admin"
MODES_DOC = "docs/operations.md, 'Interception modes'"


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("sluice run: give the command to run after --", file=sys.stderr)
        return EXIT_USAGE
    missing = netns.missing_capabilities()
    if missing:
        print(
            f"sluice run: missing {' and '.join(missing)}: transparent interception makes a "
            "network namespace and netfilter rules, which needs root. Without root, use DNS "
            "mode (meshdns answers the service names with the sidecar's address) or explicit "
            f"mode (`sluice sidecar --listen`, the app connects there); see {MODES_DOC}.",
            file=sys.stderr,
        )
        return EXIT_SETUP
    tools = netns.missing_tools()
    if tools:
        print(
            f"sluice run: {' and '.join(tools)} not found; install them "
            "(Debian: apt-get install iproute2 iptables)",
            file=sys.stderr,
        )
        return EXIT_SETUP
    problem = _check_command(command[0])
    if problem is not None:
        code, text = problem
        print(f"sluice run: {command[0]}: {text}", file=sys.stderr)
        return code
    try:
        config = build_config(args)
        dns = parse_hostport(args.dns)
        prefix = _app_prefix(args.user)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_SETUP
    except ValueError as exc:
        print(f"sluice run: {exc}", file=sys.stderr)
        return EXIT_SETUP
    install_uvloop()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # until the loop's handlers take over
        signal.signal(sig, _exit_on_signal)
    try:
        with netns.locked():
            for name in netns.clean_stale():
                log.warning("removed %s, left by a sluice run that is gone", name)
            ns = netns.create(os.getpid(), resolv_conf())
    except (netns.NetnsError, OSError) as exc:
        print(f"sluice run: cannot set up the namespace: {exc}", file=sys.stderr)
        return EXIT_SETUP
    try:
        return asyncio.run(_Supervisor(config, ns, args, dns, [*prefix, *command]).run())
    except PolicyError as exc:
        print(f"sluice run: policies rejected:\n{exc}", file=sys.stderr)
        return EXIT_SETUP
    except SpoolBusy as exc:
        print(
            f"sluice run: {exc}: give each run its own --instance or --state-dir", file=sys.stderr
        )
        return EXIT_SETUP
    except (netns.NetnsError, OSError) as exc:
        print(f"sluice run: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        with netns.locked():
            netns.remove(ns)


def _exit_on_signal(sig: int, _frame: object) -> None:
    raise SystemExit(128 + sig)  # unwinds through the cleanup in main


def _check_command(name: str) -> tuple[int, str] | None:
    """Why the command cannot run (the shell's exit code and message), or None."""
    if "/" in name:
        if not os.path.exists(name):
            return EXIT_NOT_FOUND, "No such file or directory"
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            return EXIT_CANNOT_RUN, "Permission denied"
        return None
    return None if shutil.which(name) else (EXIT_NOT_FOUND, "command not found")


def _app_prefix(user: str | None) -> list[str]:
    """`setpriv` before the app: capabilities that could undo the interception dropped,
    SIGTERM when `sluice run` dies, and another user when asked."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if user:
            raise ValueError("--user needs setpriv (util-linux)")
        log.warning("setpriv not found: the app keeps CAP_NET_ADMIN and could undo its rules")
        return []
    out = [setpriv, "--inh-caps", DROPPED_CAPS, "--bounding-set", DROPPED_CAPS]
    if user:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"--user: no user {user!r}") from None
        out += ["--reuid", str(pw.pw_uid), "--regid", str(pw.pw_gid), "--init-groups"]
    # After the user change: the kernel clears the parent-death signal on one.
    return [*out, "--pdeathsig", "TERM", "--"]


def _make_sockets() -> tuple[socket.socket, socket.socket | None, socket.socket, socket.socket]:
    """Inside the namespace: the transparent listeners (IPv4, and IPv6 on the same port
    when the kernel has it) and the relay's UDP and TCP sockets on 127.0.0.1:53."""
    netns.set_sysctl("net.ipv6.conf.eth0.disable_ipv6", "1")  # no link-local way out
    made: list[socket.socket] = []
    try:
        v4 = _bound(made, socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
        port = v4.getsockname()[1]
        try:
            v6: socket.socket | None = _bound(
                made, socket.AF_INET6, socket.SOCK_STREAM, ("::1", port)
            )
        except OSError:  # no IPv6 in this kernel: netfilter.install is told
            v6 = None
        udp = _bound(made, socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", netfilter.DNS_PORT))
        tcp = _bound(made, socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", netfilter.DNS_PORT))
    except BaseException:
        for s in made:
            s.close()
        raise
    return v4, v6, udp, tcp


def _bound(
    made: list[socket.socket], family: int, kind: int, address: tuple[str, int]
) -> socket.socket:
    s = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(address)
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    made.append(s)
    return s


class _Supervisor:
    """The sidecar, the listener, the relay and the app, in one event loop."""

    def __init__(
        self,
        config: SidecarConfig,
        ns: netns.Namespace,
        args: argparse.Namespace,
        dns: tuple[str, int],
        argv: list[str],
    ) -> None:
        self.config, self.ns, self.args, self.dns, self.argv = config, ns, args, dns, argv
        self.proc: asyncio.subprocess.Process | None = None
        self.stopped_by: int | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._signal, sig, task)
        sidecar = Sidecar(self.config, listen=False)
        relay = DnsRelay(self.dns, host_resolvers(), self.args.dns_domain)
        listener: TransparentListener | None = None
        try:
            await sidecar.start()
            v4, v6, udp, tcp = netns.in_namespace(self.ns.path, _make_sockets)
            port = v4.getsockname()[1]
            if not netfilter.install(self.ns.name, port, v6 is not None):
                netns.in_namespace(self.ns.path, _no_ipv6)
                if v6 is not None:
                    v6.close()
                    v6 = None
            listener = TransparentListener(sidecar, [v4] + ([v6] if v6 else []), self.args.unknown)
            await listener.start()
            await relay.start(udp, tcp)
            log.info(
                "%s: %s in %s (%s), %d route(s), unknown destinations: %s",
                self.config.app,
                " ".join(self.argv),
                self.ns.name,
                self.ns.ns_ip,
                len(sidecar.routes),
                self.args.unknown,
            )
            self.proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.ns.name, *self.argv
            )
            code = await self.proc.wait()
        except asyncio.CancelledError:  # a signal before the app ran
            code = -(self.stopped_by or signal.SIGTERM)
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            if listener is not None:
                await listener.close()
            await relay.close()
            await sidecar.stop()
        return 128 - code if code < 0 else code

    def _signal(self, sig: int, task: asyncio.Task[int]) -> None:
        proc = self.proc
        if proc is None:  # still starting: stop, and clean up
            if self.stopped_by is None:
                self.stopped_by = sig
                task.cancel()
            return
        if proc.returncode is not None:
            return  # the app is gone; we are stopping already
        if sig in TERMINAL and _foreground():
            return  # the terminal sent it to the app too
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _no_ipv6() -> None:
    netns.set_sysctl("net.ipv6.conf.all.disable_ipv6", "1")
    netns.set_sysctl("net.ipv6.conf.lo.disable_ipv6", "1")


def _foreground() -> bool:
    """Whether we are in the foreground process group of a terminal on our stdio."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
    return False
