"""MySQL sidecar throughput: sysbench OLTP through the sidecar and its peers, in one run.

sysbench's oltp_read_only and oltp_write_only, 8 threads, against a scratch database on the
local MariaDB (127.0.0.1:3306, root without a password): direct; through HAProxy in TCP mode
(one thread); through a bare uvloop relay (`relay.py`, the ceiling for any Python proxy);
and through `sluice sidecar --protocol mysql` with a policy set of 24 rules on the
destination (audit: non-allow decisions). sysbench uses server-side prepared statements, so
the sidecar decides every COM_STMT_EXECUTE. For each it prints tps, the ratios to direct and
to the relay, sysbench's p95 latency, errors, and the proxy's CPU time per transaction
(utime + stime from /proc/PID/stat around the run).

Target (issue 9: MySQL and MariaDB sidecar): the sidecar keeps at least 0.85x the bare
relay's tps in both workloads. Exit status 1 when it does not.

Every proxy runs as a child process on a free loopback port with a config written to a temp
dir. Targets run in a rotating order within each round; `--repeat N` takes medians.
`--events N` runs a fixed number of transactions instead of a fixed time: every proxy then
does the same work, which steadies the CPU per transaction on a shared machine.

    python bench/mysql_sidecar.py [--time 10] [--events 0] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import check, flush, guard_policy, table, write_policy_file
from pg_sidecar import SIDECAR, Target, cpu_ticks, free_port, start, stop

HOST, PORT, USER, DB = "127.0.0.1", 3306, "root", "sluice_sysbench"
THREADS, TABLES, TABLE_SIZE = 8, 4, 10_000
WORKLOADS = ("oltp_read_only", "oltp_write_only")
MIN_SHARE_OF_RELAY = 0.85
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """One sysbench run through one target."""

    tps: float
    txns: int
    errors: int
    p95_ms: float
    cpu_us: float | None  # proxy CPU per transaction; None for direct


# --- the policy set -------------------------------------------------------------------------


def write_policies(tmp: Path) -> Path:
    text = guard_policy(
        "orders-db-sysbench",
        bench_tables="sbtest*",
        dry_run_table="sbtest4",
        audit_verb="LOAD",
        write_verbs="INSERT, UPDATE, DELETE",
    )
    return write_policy_file(tmp, text, SIDECAR)


# --- database and processes -----------------------------------------------------------------


def mariadb(sql: str, port: int = PORT, db: str = "") -> subprocess.CompletedProcess[str]:
    argv = ["mariadb", "-h", HOST, "-P", str(port), "-u", USER, "--skip-ssl", "-e", sql]
    return subprocess.run(
        [*argv, *([db] if db else [])], capture_output=True, text=True, timeout=30
    )


def sysbench_argv(workload: str, port: int) -> list[str]:
    return [
        "sysbench",
        workload,
        "--db-driver=mysql",
        f"--mysql-host={HOST}",
        f"--mysql-port={port}",
        f"--mysql-user={USER}",
        f"--mysql-db={DB}",
        f"--tables={TABLES}",
        f"--table-size={TABLE_SIZE}",
    ]


def create_db() -> None:
    mariadb(f"DROP DATABASE IF EXISTS {DB}")
    mariadb(f"CREATE DATABASE {DB}").check_returncode()
    argv = [*sysbench_argv("oltp_read_only", PORT), f"--threads={TABLES}", "prepare"]
    subprocess.run(argv, capture_output=True, check=True, timeout=300)


def drop_db() -> None:
    mariadb(f"DROP DATABASE IF EXISTS {DB}")


def haproxy(tmp: Path) -> Target | None:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).is_file():
        print("haproxy not installed (make bench-deps); its rows skipped")
        return None
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        "global\n  nbthread 1\n  maxconn 256\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n"
        f"listen mysql\n  bind 127.0.0.1:{port}\n  server db {HOST}:{PORT}\n"
    )
    return start("haproxy", [binary, "-db", "-f", str(cfg)], port, tmp)


def relay(tmp: Path) -> Target | None:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("relay.py")), str(port), HOST]
    return start("relay", [*argv, str(PORT)], port, tmp)


def sidecar(tmp: Path, policies: Path) -> Target | None:
    port = free_port()
    argv = [str(SIDECAR), "sidecar", "--protocol", "mysql", "--app", "bench"]
    argv += ["--service", "orders-db", "--listen", f"127.0.0.1:{port}"]
    argv += ["--upstream", f"{HOST}:{PORT}", "--policies", str(policies)]
    argv += ["--audit", "non-allow", "--audit-log", str(tmp / "audit.jsonl")]
    return start("sidecar", [*argv, "--log-level", "warning"], port, tmp)


def check_policy_active(target: Target) -> bool:
    """One statement the policy denies, through the sidecar: proof the rules are live."""
    out = mariadb("DELETE FROM sbtest1", port=target.port, db=DB)
    denied = out.returncode != 0 and "no-unbounded-writes" in out.stderr
    print(f"{target.name}: DELETE without WHERE {'denied' if denied else 'NOT denied'}")
    if not denied:
        print(f"  mariadb said: {out.stdout}{out.stderr}".rstrip())
    return denied


# --- one sysbench run -----------------------------------------------------------------------


def sysbench(target: Target, workload: str, seconds: float, events: int = 0) -> Run:
    """One run: `seconds` long, or `events` transactions (then `seconds` is a time limit)."""
    argv = [*sysbench_argv(workload, target.port), f"--threads={THREADS}"]
    argv += [f"--time={int(seconds)}", f"--events={events}", "--percentile=95", "run"]
    before = cpu_ticks(target)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        stdout, code = out.stdout, out.returncode
    except subprocess.TimeoutExpired:
        stdout, code = "", -1
    ticks = cpu_ticks(target) - before
    txns = int(_number(r"transactions:\s+(\d+)", stdout))
    if code != 0 or not txns:
        print(f"  {workload} via {target.name} exited {code}:")
        print("  " + stdout.strip()[-600:].replace("\n", "\n  "))
    return Run(
        tps=_number(r"transactions:\s+\d+\s+\(([\d.]+) per sec", stdout),
        txns=txns,
        errors=int(_number(r"ignored errors:\s+(\d+)", stdout)),
        p95_ms=_number(r"95th percentile:\s+([\d.]+)", stdout),
        cpu_us=ticks / CLK_TCK * 1e6 / txns if target.proc is not None and txns else None,
    )


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


# --- the whole run and its report -----------------------------------------------------------


def measure(
    targets: list[Target], seconds: float, repeat: int, events: int = 0
) -> dict[str, dict[str, list[Run]]]:
    """workload -> target name -> runs; the order of targets rotates from run to run."""
    runs: dict[str, dict[str, list[Run]]] = {w: {t.name: [] for t in targets} for w in WORKLOADS}
    for target in targets:  # warm up: connections, buffer pool, the sidecar's decisions
        sysbench(target, "oltp_read_only", 2)
    turn = 0
    for r in range(repeat):
        for workload in WORKLOADS:
            order = targets[turn % len(targets) :] + targets[: turn % len(targets)]
            turn += 1
            for target in order:
                run = sysbench(target, workload, seconds, events)
                runs[workload][target.name].append(run)
                print(f"  round {r + 1} {workload:16} {target.name:8} {run.tps:9.1f} tps")
                flush()
    return runs


def median(runs: list[Run]) -> Run:
    cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
    return Run(
        tps=statistics.median(r.tps for r in runs),
        txns=int(statistics.median(r.txns for r in runs)),
        errors=sum(r.errors for r in runs),
        p95_ms=statistics.median(r.p95_ms for r in runs),
        cpu_us=statistics.median(cpu) if cpu else None,
    )


def report(workload: str, results: dict[str, Run]) -> None:
    direct, ceiling = results["direct"], results.get("relay")
    rows = [
        (
            name,
            f"{run.tps:.0f}",
            f"{run.tps / direct.tps:.2f}" if direct.tps else "-",
            f"{run.tps / ceiling.tps:.2f}" if ceiling and ceiling.tps else "-",
            f"{run.p95_ms:.2f}",
            f"{run.cpu_us:.0f}" if run.cpu_us is not None else "-",
            run.errors,
        )
        for name, run in results.items()
    ]
    headers = ("path", "tps", "x direct", "x relay", "p95 ms", "CPU µs/txn", "errors")
    print(f"\nsysbench {workload}, {THREADS} threads, {TABLES} tables of {TABLE_SIZE} rows\n")
    print(table(headers, rows))


def verdicts(medians: dict[str, dict[str, Run]]) -> bool:
    print("\nTarget (sidecar, 24 rules, audit non-allow):")
    ok = True
    for workload, results in medians.items():
        side, ceiling = results.get("sidecar"), results.get("relay")
        if side is None or ceiling is None or not ceiling.tps:
            ok = check(workload, False, "sidecar or relay did not run") and ok
            continue
        ratio = side.tps / ceiling.tps
        label = f"{workload} tps >= {MIN_SHARE_OF_RELAY}x relay"
        cpu = ""
        if side.cpu_us and ceiling.cpu_us:  # steadier than tps on a shared machine
            cpu = f" (CPU per transaction {side.cpu_us / ceiling.cpu_us:.2f}x the relay's)"
        ok = check(label, ratio >= MIN_SHARE_OF_RELAY, f"{ratio:.2f}x{cpu}") and ok
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", type=float, default=10, help="seconds per sysbench run")
    parser.add_argument(
        "--events",
        type=int,
        default=0,
        help="transactions per run instead of --time (which then becomes a limit of 600 s)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    args = parser.parse_args()
    for tool in ("sysbench", "mariadb"):
        if shutil.which(tool) is None:
            print(f"{tool} not found; skipped")
            return 0
    if mariadb("SELECT 1").returncode != 0:
        print(f"MariaDB not reachable at {HOST}:{PORT} as {USER}; skipped")
        return 0

    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="sluice-sysbench-") as name:
        tmp = Path(name)
        policies = write_policies(tmp)
        targets = [Target("direct", PORT)]
        try:
            create_db()
            for made in (haproxy(tmp), relay(tmp), sidecar(tmp, policies)):
                if made is not None:
                    targets.append(made)
            live = all(check_policy_active(t) for t in targets if t.name == "sidecar")
            flush()
            seconds = 600 if args.events else args.time
            runs = measure(targets, seconds, args.repeat, args.events)
        finally:
            for target in targets:
                stop(target)
            drop_db()
    load = os.getloadavg()
    print(f"load average after the runs {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    medians = {w: {n: median(rs) for n, rs in runs[w].items()} for w in WORKLOADS}
    for workload in WORKLOADS:
        report(workload, medians[workload])
    ok = verdicts(medians)
    ok = check("policy set active through the sidecar", live, "DELETE without WHERE") and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
