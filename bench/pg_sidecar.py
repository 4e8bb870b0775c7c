"""PostgreSQL sidecar throughput: pgbench -S through the sidecar and its peers, in one run.

pgbench's select-only script, 8 clients on 2 threads, in each query mode (simple, extended,
prepared), against a scratch database on the local PostgreSQL (127.0.0.1:5432, trust):
direct; through HAProxy (TCP mode) and PgBouncer (session pooling), from Debian; through a
bare uvloop relay (`relay.py`, the ceiling for any Python proxy); and through
`sluice sidecar` with a policy set of 24 rules on the destination (and once more with every
decision written to an audit log). For each it prints tps, the ratios to direct and to the
relay, p50/p99 latency from pgbench's per-transaction log, the latency added to direct, and
the proxy's CPU time per transaction (utime + stime from /proc/PID/stat around the run).

Targets (issue: PostgreSQL sidecar throughput): with -M prepared and -M extended, at least
0.9x the relay's tps and at most 35 µs of sidecar CPU per transaction; with -M simple,
0.8x and 50 µs; added p99 under 1 ms.

Every proxy runs as a child process on a free loopback port with a config written to a temp
dir; HAProxy is given one thread, like the others. Configurations run in a shuffled order
within each round; `--repeat N` takes medians over N rounds. HAProxy and PgBouncer rows are
skipped, with a message, where the binaries are absent (`make bench-deps` installs them).
`--transactions N` gives every path the same N transactions per client instead of the same
seconds (on a shared machine, CPU per transaction then compares like with like).
`--baseline DIR` adds a row "sidecar base": the same sidecar run from another copy of the
source tree (say, the last commit, exported to DIR), measured in the same rounds, so a change
is compared with what it replaces under the same machine load.

    python bench/pg_sidecar.py [--duration 10 | --transactions N] [--repeat 1] [--no-audit-all]
                               [--modes simple,extended,prepared] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (
    Run,
    Target,
    check,
    comparison,
    cpu_ticks,
    cpu_us,
    flush,
    free_port,
    guard_policy,
    haproxy,
    measure,
    number,
    percentile,
    proxy_run,
    relay,
    sidecar,
    sidecar_vs,
    start,
    started,
    tool_missing,
    write_policy_file,
)

PG_HOST, PG_PORT, PG_USER, DB = "127.0.0.1", 5432, "postgres", "sluice_bench"
UPSTREAM = (PG_HOST, PG_PORT)
CLIENTS, THREADS, SCALE = 8, 2, 10
MODES = ("simple", "extended", "prepared")
# mode -> (minimum tps as a fraction of the relay's, maximum sidecar CPU µs per transaction)
TARGETS = {"simple": (0.8, 50.0), "extended": (0.9, 35.0), "prepared": (0.9, 35.0)}
MAX_ADDED_P99_MS = 1.0
# Logging one transaction in ten keeps pgbench's own writes off the two cores we measure
# on, and still leaves tens of thousands of samples for a p99.
LOG_SAMPLING = 0.1
# The guard the sidecar enforces: 24 rules, none denying the benchmark's statements.
POLICY = guard_policy(
    "orders-db-bench",
    bench_tables="pgbench_*",
    dry_run_table="pgbench_history",
    audit_verb="COPY",
    write_verbs="INSERT, UPDATE, DELETE, MERGE",
)


@dataclass(frozen=True)
class Amount:
    """How long each pgbench run lasts: seconds, or transactions per client (the same work
    for every path, so that CPU per transaction compares like with like under load)."""

    seconds: float
    transactions: int | None = None

    def argv(self) -> list[str]:
        if self.transactions is not None:
            return ["-t", str(self.transactions)]
        return ["-T", str(int(self.seconds))]


# --- database and processes -----------------------------------------------------------------


def psql(sql: str, port: int = PG_PORT, db: str = "postgres") -> subprocess.CompletedProcess[str]:
    argv = ["psql", "-h", PG_HOST, "-p", str(port), "-U", PG_USER, "-d", db, "-Atc", sql]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def create_db() -> None:
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}").check_returncode()
    argv = ["pgbench", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-i", "-q"]
    subprocess.run([*argv, "-s", str(SCALE), DB], capture_output=True, check=True)


def drop_db() -> None:
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


def pgbouncer(tmp: Path) -> Target | None:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).is_file():
        print("pgbouncer not installed (make bench-deps); its rows skipped")
        return None
    port = free_port()
    (tmp / "userlist.txt").write_text(f'"{PG_USER}" ""\n')
    cfg = tmp / "pgbouncer.ini"
    cfg.write_text(
        f"[databases]\n{DB} = host={PG_HOST} port={PG_PORT} dbname={DB}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp / 'userlist.txt'}\npool_mode = session\n"
        "default_pool_size = 16\nmax_client_conn = 64\n"
        f"logfile = {tmp / 'pgbouncer.log'}\n"
    )
    argv = [binary, str(cfg)]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        argv[1:1] = ["-u", PG_USER]
        os.chmod(tmp, 0o777)
    return start("pgbouncer", argv, port, tmp)


def sidecars(tmp: Path, policies: Path, audit_all: bool, baseline: Path | None) -> list[Target]:
    """The sidecar; with `audit_all`, once more auditing every decision ("sidecar
    audit=all"); with `baseline`, once more from that copy of the source tree ("sidecar
    base")."""
    one = functools.partial(sidecar, tmp, policies, UPSTREAM, service="orders-db")
    made = [one()]
    if audit_all:
        made.append(one(name="sidecar audit=all", audit="all", audit_log=True))
    if baseline is not None:
        made.append(one(name="sidecar base", env={**os.environ, "PYTHONPATH": str(baseline)}))
    return started(*made)


def check_policy_active(target: Target) -> None:
    """One statement the policy denies, through the sidecar: proof the rules are live."""
    out = psql("DELETE FROM pgbench_history", port=target.port, db=DB)
    denied = out.returncode != 0 and "no-unbounded-writes" in out.stderr
    print(f"{target.name}: DELETE without WHERE {'denied' if denied else 'NOT denied'}")
    if not denied:
        print(f"  psql said: {out.stdout}{out.stderr}".rstrip())


# --- one pgbench run ------------------------------------------------------------------------


def pgbench(target: Target, mode: str, amount: Amount, logdir: Path | None) -> Run:
    argv = ["pgbench", "-h", "127.0.0.1", "-p", str(target.port), "-U", PG_USER, "-n", "-S"]
    argv += ["-M", mode, "-c", str(CLIENTS), "-j", str(THREADS), *amount.argv()]
    if logdir is not None:
        logdir.mkdir(parents=True)
        argv += ["-l", f"--sampling-rate={LOG_SAMPLING}", f"--log-prefix={logdir / 'tx'}"]
    before = cpu_ticks(target)
    out = subprocess.run([*argv, DB], capture_output=True, text=True, check=False)
    ticks = cpu_ticks(target) - before
    txns = int(number(r"actually processed: (\d+)", out.stdout))
    if out.returncode != 0 or not txns:
        print(f"  pgbench -M {mode} via {target.name} exited {out.returncode}:")
        print("  " + (out.stderr.strip() or out.stdout.strip())[-600:].replace("\n", "\n  "))
    latencies = _latencies(logdir) if logdir is not None else [0.0]
    return Run(
        rate=number(r"tps = ([\d.]+)", out.stdout),
        count=txns,
        errors=int(number(r"failed transactions: (\d+)", out.stdout)),
        cpu_us=cpu_us(target, ticks, txns),
        p50_ms=percentile(latencies, 0.5) / 1000,
        p99_ms=percentile(latencies, 0.99) / 1000,
    )


def _latencies(logdir: Path) -> list[float]:
    """µs per transaction from pgbench's logs (third field: `client tx latency script ...`)."""
    out = [
        float(fields[2])
        for path in logdir.iterdir()
        for fields in (line.split() for line in path.read_text().splitlines())
        if len(fields) > 2 and fields[2].isdigit()
    ]
    return out or [0.0]


# --- the whole run and its report -----------------------------------------------------------


def measure_modes(
    targets: list[Target], amount: Amount, repeat: int, tmp: Path, modes: tuple[str, ...]
) -> dict[str, dict[str, Run]]:
    """mode -> target name -> median run; each run's latency log is read, then deleted."""

    def run(target: Target, mode: str, r: int) -> Run:
        logdir = tmp / "logs" / f"{r}-{mode}-{target.name.replace(' ', '_')}"
        got = pgbench(target, mode, amount, logdir)
        shutil.rmtree(logdir)
        return got

    return measure(
        targets,
        modes,
        repeat,
        run,
        warm_up=lambda target: pgbench(target, "simple", Amount(2), None),
        progress=lambda mode, target, got: f"-M {mode:8} {target.name:18} {got.rate:9.0f} tps",
    )


def report(mode: str, results: dict[str, Run]) -> None:
    direct = results["direct"]
    columns = [
        ("p50 ms", lambda run: f"{run.p50_ms:.3f}"),
        ("p99 ms", lambda run: f"{run.p99_ms:.3f}"),
        ("+p50 ms", lambda run: f"{run.p50_ms - direct.p50_ms:+.3f}"),
        ("+p99 ms", lambda run: f"{run.p99_ms - direct.p99_ms:+.3f}"),
    ]
    print(f"\npgbench -S -M {mode}, {CLIENTS} clients, {THREADS} threads\n")
    print(comparison(results, "relay", "tps", columns, cpu="CPU µs/txn", errors="failed"))


def verdicts(medians: dict[str, dict[str, Run]]) -> bool:
    print("\nTargets (sidecar; audit non-allow):")
    ok = True
    for mode, results in medians.items():
        pair = sidecar_vs(results, "relay")
        if pair is None:
            ok = check(f"-M {mode}", False, "sidecar or relay did not run") and ok
            continue
        side, ceiling = pair
        share, budget = TARGETS[mode]
        ratio = side.rate / ceiling.rate
        cpu = side.cpu_us if side.cpu_us is not None else float("inf")
        added = side.p99_ms - results["direct"].p99_ms
        ok = check(f"-M {mode} tps >= {share}x relay", ratio >= share, f"{ratio:.2f}x") and ok
        ok = check(f"-M {mode} CPU <= {budget:.0f} µs/txn", cpu <= budget, f"{cpu:.1f} µs") and ok
        ok = (
            check(f"-M {mode} added p99 < 1 ms", added < MAX_ADDED_P99_MS, f"{added:+.3f} ms")
            and ok
        )
        ok = check(f"-M {mode} no failed transactions", side.errors == 0, str(side.errors)) and ok
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per pgbench run")
    parser.add_argument(
        "--transactions",
        type=int,
        help="transactions per client per pgbench run (pgbench -t) instead of --duration",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are reported")
    parser.add_argument("--no-audit-all", action="store_true", help="skip the audit=all row")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="pgbench -M modes, comma-separated (default: all)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a copy of the source tree to run as a second sidecar row, 'sidecar base'",
    )
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "sidecar" / "server.py").is_file():
        parser.error(f"--baseline: {args.baseline} holds no sidecar/server.py")
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if tool_missing(("pgbench", "psql"), " (postgresql-client)"):
        return 0
    if psql("SELECT 1").returncode != 0:
        print(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}; skipped")
        return 0

    targets = [Target("direct", PG_PORT)]
    with proxy_run("sluice-pgbench-", targets, cleanup=drop_db) as tmp:
        policies = write_policy_file(tmp, POLICY)
        create_db()
        targets += started(haproxy(tmp, UPSTREAM), pgbouncer(tmp), relay(tmp, UPSTREAM))
        baseline = None if args.baseline is None else args.baseline.resolve()
        targets += sidecars(tmp, policies, not args.no_audit_all, baseline)
        for target in targets:
            if target.name.startswith("sidecar"):
                check_policy_active(target)
        flush()
        amount = Amount(args.duration, args.transactions)
        medians = measure_modes(targets, amount, args.repeat, tmp, modes)
    for mode in modes:
        report(mode, medians[mode])
    return 0 if verdicts(medians) else 1


if __name__ == "__main__":
    sys.exit(main())
