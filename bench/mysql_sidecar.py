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

`--text` adds both workloads with `--db-ps-mode=disable` ("oltp_read_only/text"...): sysbench
then sends every statement as COM_QUERY with its values inlined, as PyMySQL and most PHP
apps do, so each text is new and the sidecar decides it through the shape cache
(docs/decisions/0012). The target applies to the prepared-statement workloads only.

Every proxy runs as a child process on a free loopback port with a config written to a temp
dir. Targets run in a new (seeded) order in each round; `--repeat N` takes medians.
`--events N` runs a fixed number of transactions instead of a fixed time: every proxy then
does the same work, which steadies the CPU per transaction on a shared machine.
`--baseline DIR` adds a row "sidecar base": the same sidecar run from another copy of the
source tree (say, the last commit exported to DIR, with its compiled modules: unpack the
`.so` files and `sidecar/_built.py` of `pip wheel --no-deps DIR` into DIR), measured in the
same rounds, so a change is compared with what it replaces under the same machine load; the
target is checked on "sidecar".

    python bench/mysql_sidecar.py [--time 10] [--events 0] [--repeat 1] [--text]
                                  [--workloads oltp_read_only,...] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

from common import (
    Run,
    Target,
    check,
    comparison,
    cpu_ticks,
    cpu_us,
    flush,
    guard_policy,
    haproxy,
    measure,
    number,
    proxy_run,
    relay,
    sidecar,
    sidecar_vs,
    started,
    tool_missing,
    write_policy_file,
)

HOST, PORT, USER, DB = "127.0.0.1", 3306, "root", "sluice_sysbench"
UPSTREAM = (HOST, PORT)
THREADS, TABLES, TABLE_SIZE = 8, 4, 10_000
WORKLOADS = ("oltp_read_only", "oltp_write_only")
TEXT = "/text"  # a workload name's suffix: sysbench --db-ps-mode=disable
MIN_SHARE_OF_RELAY = 0.85
# The guard the sidecar enforces: 24 rules, none denying the benchmark's statements.
POLICY = guard_policy(
    "orders-db-sysbench",
    bench_tables="sbtest*",
    dry_run_table="sbtest4",
    audit_verb="LOAD",
    write_verbs="INSERT, UPDATE, DELETE",
)


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
    script, text, _ = workload.partition(TEXT)
    argv = [*sysbench_argv(script, target.port), f"--threads={THREADS}"]
    if text:
        argv.append("--db-ps-mode=disable")
    argv += [f"--time={int(seconds)}", f"--events={events}", "--percentile=95", "run"]
    before = cpu_ticks(target)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        stdout, code = out.stdout, out.returncode
    except subprocess.TimeoutExpired:
        stdout, code = "", -1
    ticks = cpu_ticks(target) - before
    txns = int(number(r"transactions:\s+(\d+)", stdout))
    if code != 0 or not txns:
        print(f"  {workload} via {target.name} exited {code}:")
        print("  " + stdout.strip()[-600:].replace("\n", "\n  "))
    return Run(
        rate=number(r"transactions:\s+\d+\s+\(([\d.]+) per sec", stdout),
        count=txns,
        errors=int(number(r"ignored errors:\s+(\d+)", stdout)),
        cpu_us=cpu_us(target, ticks, txns),
        p95_ms=number(r"95th percentile:\s+([\d.]+)", stdout),
    )


# --- the whole run and its report -----------------------------------------------------------


def report(workload: str, results: dict[str, Run]) -> None:
    columns = [("p95 ms", lambda run: f"{run.p95_ms:.2f}")]
    script, text, _ = workload.partition(TEXT)
    how = "COM_QUERY with inlined values" if text else "server-side prepared statements"
    print(f"\nsysbench {script}, {THREADS} threads, {TABLES} tables of {TABLE_SIZE} rows, {how}\n")
    print(comparison(results, "relay", "tps", columns, cpu="CPU µs/txn", cpu_digits=0))


def verdicts(medians: dict[str, dict[str, Run]]) -> bool:
    print("\nTarget (sidecar, 24 rules, audit non-allow):")
    ok = True
    for workload, results in medians.items():
        if workload.endswith(TEXT):  # informative: the target is for prepared ones
            continue
        pair = sidecar_vs(results, "relay")
        if pair is None:
            ok = check(workload, False, "sidecar or relay did not run") and ok
            continue
        side, ceiling = pair
        ratio = side.rate / ceiling.rate
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
    parser.add_argument(
        "--text",
        action="store_true",
        help="also run both workloads with literals inlined in COM_QUERY (--db-ps-mode=disable)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="sysbench scripts, comma-separated (default: all)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a copy of the source tree to run as a second sidecar row, 'sidecar base'",
    )
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "sidecar" / "server.py").is_file():
        parser.error(f"--baseline: {args.baseline} holds no sidecar/server.py")
    chosen = tuple(w for w in args.workloads.split(",") if w)
    if not chosen or set(chosen) - set(WORKLOADS):
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    workloads = chosen + (tuple(w + TEXT for w in chosen) if args.text else ())
    if tool_missing(("sysbench", "mariadb")):
        return 0
    if mariadb("SELECT 1").returncode != 0:
        print(f"MariaDB not reachable at {HOST}:{PORT} as {USER}; skipped")
        return 0

    targets = [Target("direct", PORT)]
    with proxy_run("sluice-sysbench-", targets, cleanup=drop_db) as tmp:
        policies = write_policy_file(tmp, POLICY)
        create_db()
        one = functools.partial(
            sidecar, tmp, policies, UPSTREAM, service="orders-db", protocol="mysql", audit_log=True
        )
        base = None
        if args.baseline is not None:
            env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
            base = one(name="sidecar base", env=env)
        targets += started(haproxy(tmp, UPSTREAM), relay(tmp, UPSTREAM), one(), base)
        live = all(check_policy_active(t) for t in targets if t.name.startswith("sidecar"))
        flush()
        seconds = 600 if args.events else args.time
        medians = measure(
            targets,
            workloads,
            args.repeat,
            lambda target, workload, _: sysbench(target, workload, seconds, args.events),
            warm_up=lambda target: sysbench(target, "oltp_read_only", 2),
            progress=lambda workload, target, run: (
                f"{workload:16} {target.name:8} {run.rate:9.1f} tps"
            ),
        )
    for workload in workloads:
        report(workload, medians[workload])
    ok = verdicts(medians)
    ok = check("policy set active through the sidecar", live, "DELETE without WHERE") and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
