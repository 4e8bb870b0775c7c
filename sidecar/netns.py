"""The network namespace `sluice run` puts an app in: create, address, clean up.

Layout (docs/decisions/0009-transparent-interception.md): a namespace named
`sluice-<pid>` (the pid of `sluice run`), a veth pair `sl<pid>` (host) -- `eth0` (inside)
with a /30 from the link-local pool 169.254.64.0/18 and a default route to the host end,
and `/etc/netns/<name>/resolv.conf`, which `ip netns exec` bind-mounts over
/etc/resolv.conf for the app. The sidecar itself stays in the host namespace; only its
listening sockets are made inside (`in_namespace`), so its upstream connections never
meet the namespace's netfilter rules (sidecar/netfilter.py).

Cleanup: `remove` on exit; a `sluice run` killed with SIGKILL leaves its namespace
behind, and the next `sluice run` removes every `sluice-<pid>` whose pid is dead (or was
reused: the process start time is kept in /run/sluice/<name>.pid). Setup and cleanup run
under one lock, so concurrent starts pick different addresses.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("sluice.run")

_T = TypeVar("_T")

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts namespaces
NETNS_ETC = Path("/etc/netns")  # files `ip netns exec` bind-mounts over /etc
STATE_DIR = Path("/run/sluice")  # <name>.pid: "pid starttime" of the owning sluice run
PREFIX = "sluice-"
# Link-local: never routed, so the pair cannot clash with a LAN; clear of 169.254.169.254
# and 169.254.170.2 (cloud metadata). 4096 /30 blocks.
POOL = ipaddress.IPv4Network("169.254.64.0/18")
CLONE_NEWNET = 0x40000000
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}
_NAME = re.compile(r"^sluice-(\d+)$")


class NetnsError(Exception):
    """Setting up or using the namespace failed; the message says what and why."""


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    pid: int
    host_if: str
    host_ip: str
    ns_ip: str
    prefix: int = 30

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)


def missing_capabilities() -> list[str]:
    """The capabilities `sluice run` needs and this process lacks (effective set)."""
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
    except (OSError, AttributeError, ValueError):
        return list(CAPABILITIES)
    return [name for name, bit in CAPABILITIES.items() if not effective >> bit & 1]


def missing_tools() -> list[str]:
    """Programs `sluice run` calls that are not on PATH."""
    return [t for t in ("ip", "iptables-restore") if shutil.which(t) is None]


def in_namespace(path: str, make: Callable[[], _T]) -> _T:
    """Run `make` on a fresh thread switched into the network namespace at `path`, and
    return its result: sockets it creates stay in that namespace. The thread switches
    back and then ends, so no thread of this process is ever left inside."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError as exc:
            os.close(own)
            failure.append(NetnsError(f"cannot open namespace {path}: {exc.strerror}"))
            return
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns({path}): {os.strerror(err)}")
            try:
                if current() != os.fstat(target).st_ino:  # what `make` creates must be there
                    raise NetnsError(f"setns({path}) did not switch namespaces")
                result.append(make())
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0 or current() != os.fstat(own).st_ino:
                    log.error("setns back failed: this thread ends without running more")
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=run, name="sluice-setns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def current() -> int:
    """This thread's network namespace (its inode), to compare with an expected one."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def _ip(*args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            ["ip", *args], input=stdin, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        what = stdin.strip().replace("\n", "; ") if stdin else " ".join(args)
        raise NetnsError(f"ip {what}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serialise namespace setup and cleanup between `sluice run` processes."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(STATE_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name may hold spaces


def _owner_alive(name: str, pid: int) -> bool:
    started = _start_time(pid)
    if started is None:
        return False
    try:
        recorded = (STATE_DIR / f"{name}.pid").read_text().split()
    except OSError:
        return True  # no record: a live pid is given the benefit of the doubt
    return recorded[1:2] == [started]


def clean_stale() -> list[str]:
    """Remove namespaces (and their veth, resolv.conf, record) left by a `sluice run`
    that is gone; returns their names. Call under `locked()`."""
    names = {p.name for p in NETNS_DIR.glob(PREFIX + "*")}
    names |= {p.name for p in NETNS_ETC.glob(PREFIX + "*")}
    names |= {p.name.removesuffix(".pid") for p in STATE_DIR.glob(PREFIX + "*.pid")}
    removed = []
    for name in sorted(names):
        m = _NAME.match(name)
        if m is None or _owner_alive(name, int(m.group(1))):
            continue
        remove(_stale(name, int(m.group(1))))
        removed.append(name)
    return removed


def _stale(name: str, pid: int) -> Namespace:
    return Namespace(name, pid, f"sl{pid}", "", "")


def _used_blocks() -> set[int]:
    used = set()
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", _ip("-4", "-o", "addr", "show")):
        address = ipaddress.IPv4Address(m.group(1))
        if address in POOL:
            used.add((int(address) - int(POOL.network_address)) // 4)
    return used


def create(pid: int, resolv_conf: str) -> Namespace:
    """The namespace for `sluice run` with this pid. Call under `locked()`; on failure,
    whatever was made is removed again."""
    name = f"{PREFIX}{pid}"
    blocks = POOL.num_addresses // 4
    used = _used_blocks()
    free = next((b for i in range(blocks) if (b := (pid + i) % blocks) not in used), None)
    if free is None:
        raise NetnsError(f"no free /30 left in {POOL} (one per running sluice run)")
    base = int(POOL.network_address) + 4 * free
    ns = Namespace(
        name,
        pid,
        f"sl{pid}",
        str(ipaddress.IPv4Address(base + 1)),
        str(ipaddress.IPv4Address(base + 2)),
    )
    if (NETNS_DIR / name).exists():  # a pid reused after a kill -9, not cleaned yet
        remove(ns)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / f"{name}.pid").write_text(f"{pid} {_start_time(pid)}\n")
    try:
        etc = NETNS_ETC / name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(resolv_conf)
        _ip("netns", "add", name)
        _ip(
            "-batch",
            "-",
            stdin=f"link add {ns.host_if} type veth peer name eth0 netns {name}\n"
            f"addr add {ns.host_ip}/{ns.prefix} dev {ns.host_if}\n"
            f"link set {ns.host_if} up\n",
        )
        _ip(
            "-n",
            name,
            "-batch",
            "-",
            stdin="link set lo up\n"
            f"addr add {ns.ns_ip}/{ns.prefix} dev eth0\n"
            "link set eth0 up\n"
            f"route add default via {ns.host_ip}\n",
        )
    except BaseException:
        remove(ns)
        raise
    return ns


def set_sysctl(key: str, value: str) -> bool:
    """Write /proc/sys/<key> (dots as slashes) in the current thread's namespace; False
    when the key does not exist (IPv6 disabled in the kernel)."""
    try:
        Path("/proc/sys", *key.split(".")).write_text(value)
    except FileNotFoundError:
        return False
    return True


def remove(ns: Namespace) -> None:
    """Delete the namespace, the host end of its veth, its resolv.conf and its record.
    Every step is tried; none fails when its object is already gone."""
    if (NETNS_DIR / ns.name).exists():
        try:
            _ip("netns", "del", ns.name)
        except NetnsError as exc:
            log.warning("%s", exc)
    # The veth dies with the namespace unless a process still holds it (an orphaned app).
    with contextlib.suppress(NetnsError):
        if _ip("-o", "link", "show", "dev", ns.host_if):
            _ip("link", "del", ns.host_if)
    shutil.rmtree(NETNS_ETC / ns.name, ignore_errors=True)
    with contextlib.suppress(OSError):
        (STATE_DIR / f"{ns.name}.pid").unlink()
