"""Shared helpers for the benchmarks: bounded timing loops, percentiles and tables; for the
sidecar benchmarks, the guard policy set, the proxies under test as child processes (start,
stop, CPU time from /proc), rounds of runs with medians, and the comparison table."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SLUICE_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "corpus"


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_each(fn: Callable[[int], object], count: int, budget_s: float = 5.0) -> list[float]:
    """Call fn(i) up to `count` times (stopping after `budget_s`); microseconds per call."""
    out: list[float] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    for i in range(count):
        t0 = clock()
        fn(i)
        t1 = clock()
        out.append((t1 - t0) / 1000)
        if t1 > deadline:
            break
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def check(label: str, ok: bool, detail: str) -> bool:
    print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {detail}")
    return ok


def need_corpus(name: str) -> bool:
    if not (CORPUS / name).is_file():
        print(
            f"corpus {CORPUS / name} not found (set SLUICE_SHARED to the shared/ folder); skipped"
        )
        return False
    return True


def flush() -> None:
    sys.stdout.flush()


def tool_missing(tools: Sequence[str], hint: str = "") -> bool:
    """Whether one of `tools` is neither on PATH nor in /usr/sbin; says which, and that the
    benchmark is skipped."""
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").is_file():
            print(f"{tool} not found{hint}; skipped")
            return True
    return False


def number(pattern: str, text: str) -> float:
    """The first group of `pattern` in a load tool's output, as a float; 0.0 if absent."""
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def _loads() -> str:
    """The load average (1, 5, 15 minutes), printed before and after every sidecar run."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# --- the processes a sidecar benchmark runs its load through ----------------------------

SLUICE = REPO / ".venv" / "bin" / "sluice"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# HAProxy's defaults for a TCP proxy (PostgreSQL, MySQL); the HTTP benchmark passes its own.
HAPROXY_TCP = "  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n"


@dataclass(frozen=True)
class Target:
    """Somewhere the load tool connects: the server itself ("direct") or a proxy we started."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    name: str, argv: Sequence[str], port: int, tmp: Path, env: dict[str, str] | None = None
) -> Target | None:
    """Start a proxy and wait until it accepts connections; None (and why) if it cannot."""
    err = open(tmp / f"{name}.stderr", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp, env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Target(name, port, proc)
        except OSError:
            time.sleep(0.1)
    stop(Target(name, port, proc))
    detail = (tmp / f"{name}.stderr").read_text(errors="replace").strip()
    print(f"{name}: did not start ({detail[-300:] or 'no output'}); its rows skipped")
    return None


def stop(target: Target) -> None:
    if target.proc is not None:
        terminate(target.proc)


def terminate(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    """SIGTERM, and SIGKILL if the process has not exited within `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def proxy_run(
    prefix: str, targets: list[Target], cleanup: Callable[[], object] = lambda: None
) -> Iterator[Path]:
    """A temp dir for the proxies' configs and logs. On the way out every target in
    `targets` (which the caller appends to) is stopped and `cleanup` runs, whatever
    happened; the load average is printed before and after."""
    print(f"{os.cpu_count()} CPUs, load average {_loads()}")
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        try:
            yield Path(name)
        finally:
            for target in reversed(targets):
                stop(target)
            cleanup()
    print(f"load average after the runs {_loads()}")


def started(*made: Target | None) -> list[Target]:
    """The proxies that did start (each that did not has said why)."""
    return [target for target in made if target is not None]


def haproxy(
    tmp: Path, upstream: tuple[str, int], defaults: str = HAPROXY_TCP, maxconn: int = 256
) -> Target | None:
    """HAProxy with one thread, like the other proxies, in front of `upstream`."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).is_file():
        print("haproxy not installed (make bench-deps); its rows skipped")
        return None
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        f"global\n  nbthread 1\n  maxconn {maxconn}\ndefaults\n{defaults}"
        f"listen bench\n  bind 127.0.0.1:{port}\n  server upstream {upstream[0]}:{upstream[1]}\n"
    )
    return start("haproxy", [binary, "-db", "-f", str(cfg)], port, tmp)


def relay(tmp: Path, upstream: tuple[str, int]) -> Target | None:
    """The bare uvloop relay (`relay.py`): the ceiling for any Python proxy."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("relay.py")), str(port)]
    return start("relay", [*argv, upstream[0], str(upstream[1])], port, tmp)


def sidecar(
    tmp: Path,
    policies: Path,
    upstream: tuple[str, int],
    *,
    service: str,
    protocol: str | None = None,
    audit: str = "non-allow",
    audit_log: bool = False,
    name: str = "sidecar",
    env: dict[str, str] | None = None,
) -> Target | None:
    """`sluice sidecar` as app `bench` in front of `upstream`; `protocol` None: its default."""
    port = free_port()
    argv = [str(SLUICE), "sidecar", *(["--protocol", protocol] if protocol else [])]
    argv += ["--app", "bench", "--service", service, "--listen", f"127.0.0.1:{port}"]
    argv += ["--upstream", f"{upstream[0]}:{upstream[1]}", "--policies", str(policies)]
    argv += ["--audit", audit, "--log-level", "warning"]
    if audit_log:
        # One log per sidecar: a baseline row must not append to the other's file.
        argv += ["--audit-log", str(tmp / f"{name.replace(' ', '-')}.audit.jsonl")]
    return start(name, argv, port, tmp, env)


def cpu_ticks(target: Target) -> int:
    """utime + stime of the target's process and its children (nginx's worker), from /proc."""
    if target.proc is None:
        return 0
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [target.proc.pid]
    for _ in range(1000):  # bounded walk of the tree
        if not todo:
            break
        pid = todo.pop()
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])  # utime, stime (14, 15 of stat)
        todo += children.get(pid, [])
    return total


def cpu_us(target: Target, ticks: int, count: int) -> float | None:
    """The proxy's CPU µs per transaction or request; None for direct (no proxy)."""
    if target.name == "direct" or target.proc is None or not count:
        return None
    return ticks / CLK_TCK * 1e6 / count


# --- runs, rounds and the comparison table ------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One load-tool run through one target; latencies are those the tool reports (0 if not)."""

    rate: float  # transactions or requests per second
    count: int  # transactions or requests done
    errors: int  # failed transactions, ignored errors, non-2xx/3xx responses
    cpu_us: float | None  # proxy CPU per transaction or request; None for direct
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


def median(runs: Sequence[Run]) -> Run:
    """The median of each figure over rounds; errors are summed."""
    cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
    return Run(
        rate=statistics.median(r.rate for r in runs),
        count=int(statistics.median(r.count for r in runs)),
        errors=sum(r.errors for r in runs),
        cpu_us=statistics.median(cpu) if cpu else None,
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p95_ms=statistics.median(r.p95_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
    )


def ordered(targets: Sequence[Target], turn: int) -> list[Target]:
    """The targets in the `turn`-th order: a shuffle seeded by `turn` (the same on every
    run of the bench), so that no target always runs first, nor always after the same
    neighbour. A rotation kept the neighbours: on the MySQL write-only workload the run
    after another write-heavy one pays for the server's purge and flushing, and the same
    sidecar build measured 10% apart in two adjacent rows, every round."""
    order = list(targets)
    random.Random(turn).shuffle(order)
    return order


def measure(
    targets: Sequence[Target],
    workloads: Sequence[str],
    repeat: int,
    run: Callable[[Target, str, int], Run],
    warm_up: Callable[[Target], object],
    progress: Callable[[str, Target, Run], str],
) -> dict[str, dict[str, Run]]:
    """workload -> target name -> median over `repeat` rounds of `run(target, workload,
    round)`. Every target is warmed up first (connections, caches, the sidecar's decisions);
    the order of targets changes from one workload and round to the next (`ordered`)."""
    runs: dict[str, dict[str, list[Run]]] = {w: {t.name: [] for t in targets} for w in workloads}
    for target in targets:
        warm_up(target)
    turn = 0
    for r in range(repeat):
        for workload in workloads:
            for target in ordered(targets, turn):
                got = run(target, workload, r)
                runs[workload][target.name].append(got)
                print(f"  round {r + 1} {progress(workload, target, got)}")
                flush()
            turn += 1
    return {w: {name: median(rs) for name, rs in by.items()} for w, by in runs.items()}


def ratio(rate: float, base: Run | None) -> str:
    return f"{rate / base.rate:.2f}" if base is not None and base.rate else "-"


def comparison(
    results: dict[str, Run],
    peer: str,
    rate: str,
    columns: Sequence[tuple[str, Callable[[Run], object]]],
    cpu: str,
    errors: str = "errors",
    cpu_digits: int = 1,
) -> str:
    """The table every sidecar benchmark prints: a row per path with its rate, its ratios to
    direct and to `peer`, the tool's `columns`, the proxy's CPU per unit of work, errors."""
    direct, base = results["direct"], results.get(peer)
    rows = [
        (
            name,
            f"{run.rate:.0f}",
            ratio(run.rate, direct),
            ratio(run.rate, base),
            *(cell(run) for _, cell in columns),
            f"{run.cpu_us:.{cpu_digits}f}" if run.cpu_us is not None else "-",
            run.errors,
        )
        for name, run in results.items()
    ]
    headers = ("path", rate, "x direct", f"x {peer}", *(h for h, _ in columns), cpu, errors)
    return table(headers, rows)


def sidecar_vs(results: dict[str, Run], peer: str) -> tuple[Run, Run] | None:
    """The sidecar's and the peer's runs, or None when either did not run (or did nothing)."""
    side, base = results.get("sidecar"), results.get(peer)
    if side is None or base is None or not base.rate:
        return None
    return side, base


# --- the policy set the sidecar benchmarks run with -------------------------------------

OTHER_TABLES = ("orders", "order_items", "customers", "invoices", "shipments", "refunds")


def guard_policy(
    name: str, *, bench_tables: str, dry_run_table: str, audit_verb: str, write_verbs: str
) -> str:
    """24 rules on orders-db, what a real guard holds, none denying the benchmark's own
    statements: deny, limit, audit and dry-run rules, time windows, source apps, tables."""
    rules = [
        "- {name: no-drop-truncate, sql: {verbs: [DROP, TRUNCATE]}, action: deny}",
        "- {name: no-unbounded-writes, sql: {verbs: [DELETE, UPDATE], where: absent}, action: deny}",
        f"- {{name: night-freeze, sql: {{verbs: [DELETE], tables: ['{bench_tables}']}}, when: {{time: '01:00-03:00'}}, action: deny}}",
        "- {name: weekday-ddl, sql: {verbs: [ALTER, CREATE]}, when: {time: '08:00-18:00', days: [mon, tue, wed, thu, fri]}, action: deny}",
        "- {name: weekend-ddl, sql: {verbs: [ALTER]}, when: {time: '00:00-06:00', days: [sat, sun]}, action: deny}",
        "- {name: audit-grants, sql: {verbs: [GRANT, REVOKE]}, action: audit}",
        f"- {{name: audit-{audit_verb.lower()}, sql: {{verbs: [{audit_verb}]}}, action: audit}}",
        "- {name: no-lock, sql: {verbs: [LOCK]}, action: deny}",
        "- {name: no-opaque-at-night, sql: {verbs: [CALL, DO]}, when: {time: '22:00-06:00'}, action: deny}",
        f"- {{name: reporting-read-only, from: [reporting], sql: {{verbs: [{write_verbs}]}}, action: deny}}",
        f"- {{name: analytics-budget, from: [analytics], sql: {{verbs: [SELECT], tables: ['{bench_tables}']}}, action: limit, limit: {{rate: 50}}}}",
        "- {name: batch-off-hours, from: ['batch-*'], sql: {verbs: [SELECT]}, when: {time: '08:00-18:00'}, action: deny}",
        "- {name: web-deletes, from: [web], sql: {verbs: [DELETE]}, action: audit}",
        "- {name: billing-no-ddl, from: [billing], sql: {verbs: [CREATE, ALTER, DROP]}, action: deny}",
        f"- {{name: dry-run-{dry_run_table.replace('_', '-')}, sql: {{verbs: [DELETE], tables: [{dry_run_table}]}}, action: deny, enforce: false}}",
    ]
    for i, table_name in enumerate(OTHER_TABLES):
        verbs = ("INSERT", "UPDATE", "SELECT")[i % 3]
        rules.append(
            f"- {{name: {table_name}-budget, sql: {{verbs: [{verbs}], tables: [{table_name}]}}, "
            f"action: limit, limit: {{rate: 100000, burst: 100000}}}}"
        )
    rules += [
        "- {name: orders-delete-window, sql: {verbs: [DELETE], tables: [orders, order_items]}, when: {time: '12:00-13:00'}, action: deny}",
        "- {name: customers-pii, from: [web, reporting], sql: {verbs: [SELECT], tables: [customers]}, action: audit}",
        "- {name: invoices-immutable, sql: {verbs: [UPDATE, DELETE], tables: [invoices]}, action: deny}",
    ]
    head = (
        f"apiVersion: sluice/v1\nkind: Policy\nmetadata: {{name: {name}}}\n"
        "spec:\n  destination: orders-db\n  timezone: UTC\n  rules:\n"
    )
    return head + "".join(f"    {r}\n" for r in rules)


def write_policy_file(tmp: Path, text: str) -> Path:
    """Write the policy set and check it with `sluice policy check`; exit if it is rejected."""
    path = tmp / "policies.yaml"
    path.write_text(text)
    argv = [str(SLUICE), "policy", "check", str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"generated policy set rejected:\n{out.stdout}{out.stderr}")
    print(f"policy set: {(out.stdout + out.stderr).strip()}")
    return path
