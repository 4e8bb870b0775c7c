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
dir; HAProxy is given one thread, like the others. Configurations run in a rotating order
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
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import REPO, check, flush, guard_policy, percentile, table, write_policy_file

PG_HOST, PG_PORT, PG_USER, DB = "127.0.0.1", 5432, "postgres", "sluice_bench"
CLIENTS, THREADS, SCALE = 8, 2, 10
MODES = ("simple", "extended", "prepared")
# mode -> (minimum tps as a fraction of the relay's, maximum sidecar CPU µs per transaction)
TARGETS = {"simple": (0.8, 50.0), "extended": (0.9, 35.0), "prepared": (0.9, 35.0)}
MAX_ADDED_P99_MS = 1.0
# Logging one transaction in ten keeps pgbench's own writes off the two cores we measure
# on, and still leaves tens of thousands of samples for a p99.
LOG_SAMPLING = 0.1
SIDECAR = REPO / ".venv" / "bin" / "sluice"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """Somewhere pgbench can connect: PostgreSQL itself or a proxy we started."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None


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


@dataclass(frozen=True)
class Run:
    tps: float
    txns: int
    failed: int
    p50_ms: float
    p99_ms: float
    cpu_us: float | None  # proxy CPU per transaction; None for direct


# --- the policy set -------------------------------------------------------------------------


def write_policies(tmp: Path) -> Path:
    text = guard_policy(
        "orders-db-bench",
        bench_tables="pgbench_*",
        dry_run_table="pgbench_history",
        audit_verb="COPY",
        write_verbs="INSERT, UPDATE, DELETE, MERGE",
    )
    return write_policy_file(tmp, text, SIDECAR)


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
    if target.proc is None or target.proc.poll() is not None:
        return
    target.proc.terminate()
    try:
        target.proc.wait(5)
    except subprocess.TimeoutExpired:
        target.proc.kill()
        target.proc.wait()


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
        f"listen pg\n  bind 127.0.0.1:{port}\n  server pg {PG_HOST}:{PG_PORT}\n"
    )
    return start("haproxy", [binary, "-db", "-f", str(cfg)], port, tmp)


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


def relay(tmp: Path) -> Target | None:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("relay.py")), str(port), PG_HOST]
    return start("relay", [*argv, str(PG_PORT)], port, tmp)


def sidecar(
    tmp: Path, policies: Path, audit_all: bool, source: Path | None = None
) -> Target | None:
    """The sidecar; with `source`, run from that copy of the source tree ("sidecar base")."""
    port = free_port()
    name = "sidecar audit=all" if audit_all else "sidecar"
    env = None
    if source is not None:
        name = "sidecar base"
        env = {**os.environ, "PYTHONPATH": str(source)}
    argv = [str(SIDECAR), "sidecar", "--app", "bench", "--service", "orders-db"]
    argv += ["--listen", f"127.0.0.1:{port}", "--upstream", f"{PG_HOST}:{PG_PORT}"]
    argv += ["--policies", str(policies), "--log-level", "warning"]
    if audit_all:
        argv += ["--audit", "all", "--audit-log", str(tmp / "audit.jsonl")]
    else:
        argv += ["--audit", "non-allow"]
    return start(name, argv, port, tmp, env)


def check_policy_active(target: Target) -> None:
    """One statement the policy denies, through the sidecar: proof the rules are live."""
    out = psql("DELETE FROM pgbench_history", port=target.port, db=DB)
    denied = out.returncode != 0 and "no-unbounded-writes" in out.stderr
    print(f"{target.name}: DELETE without WHERE {'denied' if denied else 'NOT denied'}")
    if not denied:
        print(f"  psql said: {out.stdout}{out.stderr}".rstrip())


# --- one pgbench run ------------------------------------------------------------------------


def cpu_ticks(target: Target) -> int:
    if target.proc is None:
        return 0
    fields = Path(f"/proc/{target.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def pgbench(target: Target, mode: str, amount: Amount, logdir: Path | None) -> Run:
    argv = ["pgbench", "-h", "127.0.0.1", "-p", str(target.port), "-U", PG_USER, "-n", "-S"]
    argv += ["-M", mode, "-c", str(CLIENTS), "-j", str(THREADS), *amount.argv()]
    if logdir is not None:
        logdir.mkdir(parents=True)
        argv += ["-l", f"--sampling-rate={LOG_SAMPLING}", f"--log-prefix={logdir / 'tx'}"]
    before = cpu_ticks(target)
    out = subprocess.run([*argv, DB], capture_output=True, text=True, check=False)
    ticks = cpu_ticks(target) - before
    txns = _number(r"actually processed: (\d+)", out.stdout)
    if out.returncode != 0 or not txns:
        print(f"  pgbench -M {mode} via {target.name} exited {out.returncode}:")
        print("  " + (out.stderr.strip() or out.stdout.strip())[-600:].replace("\n", "\n  "))
    latencies = _latencies(logdir) if logdir is not None else [0.0]
    return Run(
        tps=_number(r"tps = ([\d.]+)", out.stdout),
        txns=int(txns),
        failed=int(_number(r"failed transactions: (\d+)", out.stdout)),
        p50_ms=percentile(latencies, 0.5) / 1000,
        p99_ms=percentile(latencies, 0.99) / 1000,
        cpu_us=ticks / CLK_TCK * 1e6 / txns if target.proc is not None and txns else None,
    )


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


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


def measure(
    targets: list[Target], amount: Amount, repeat: int, tmp: Path, modes: tuple[str, ...]
) -> dict[str, dict[str, list[Run]]]:
    """mode -> target name -> runs; the order of targets rotates from one run to the next."""
    runs: dict[str, dict[str, list[Run]]] = {m: {t.name: [] for t in targets} for m in modes}
    for target in targets:  # warm up: connections, caches, the sidecar's decisions
        pgbench(target, "simple", Amount(2), None)
    turn = 0
    for r in range(repeat):
        for mode in modes:
            order = targets[turn % len(targets) :] + targets[: turn % len(targets)]
            turn += 1
            for target in order:
                logdir = tmp / "logs" / f"{r}-{mode}-{target.name.replace(' ', '_')}"
                run = pgbench(target, mode, amount, logdir)
                shutil.rmtree(logdir)
                runs[mode][target.name].append(run)
                print(f"  round {r + 1} -M {mode:8} {target.name:18} {run.tps:9.0f} tps")
                flush()
    return runs


def median(runs: list[Run]) -> Run:
    cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
    return Run(
        tps=statistics.median(r.tps for r in runs),
        txns=int(statistics.median(r.txns for r in runs)),
        failed=sum(r.failed for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        cpu_us=statistics.median(cpu) if cpu else None,
    )


def report(mode: str, results: dict[str, Run]) -> None:
    direct, ceiling = results["direct"], results.get("relay")
    rows = []
    for name, run in results.items():
        rows.append(
            (
                name,
                f"{run.tps:.0f}",
                f"{run.tps / direct.tps:.2f}" if direct.tps else "-",
                f"{run.tps / ceiling.tps:.2f}" if ceiling and ceiling.tps else "-",
                f"{run.p50_ms:.3f}",
                f"{run.p99_ms:.3f}",
                f"{run.p50_ms - direct.p50_ms:+.3f}",
                f"{run.p99_ms - direct.p99_ms:+.3f}",
                f"{run.cpu_us:.1f}" if run.cpu_us is not None else "-",
                run.failed,
            )
        )
    headers = ("path", "tps", "x direct", "x relay", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms")
    print(f"\npgbench -S -M {mode}, {CLIENTS} clients, {THREADS} threads\n")
    print(table((*headers, "CPU µs/txn", "failed"), rows))


def verdicts(medians: dict[str, dict[str, Run]]) -> bool:
    print("\nTargets (sidecar; audit non-allow):")
    ok = True
    for mode in medians:
        results = medians[mode]
        side, ceiling, direct = results.get("sidecar"), results.get("relay"), results["direct"]
        if side is None or ceiling is None or not ceiling.tps:
            ok = check(f"-M {mode}", False, "sidecar or relay did not run") and ok
            continue
        share, budget = TARGETS[mode]
        ratio = side.tps / ceiling.tps
        cpu = side.cpu_us if side.cpu_us is not None else float("inf")
        added = side.p99_ms - direct.p99_ms
        ok = check(f"-M {mode} tps >= {share}x relay", ratio >= share, f"{ratio:.2f}x") and ok
        ok = check(f"-M {mode} CPU <= {budget:.0f} µs/txn", cpu <= budget, f"{cpu:.1f} µs") and ok
        ok = (
            check(f"-M {mode} added p99 < 1 ms", added < MAX_ADDED_P99_MS, f"{added:+.3f} ms")
            and ok
        )
        ok = check(f"-M {mode} no failed transactions", side.failed == 0, str(side.failed)) and ok
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
    for tool in ("pgbench", "psql"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (postgresql-client); skipped")
            return 0
    if psql("SELECT 1").returncode != 0:
        print(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}; skipped")
        return 0

    load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="sluice-pgbench-") as name:
        tmp = Path(name)
        policies = write_policies(tmp)
        targets = [Target("direct", PG_PORT)]
        try:
            create_db()
            for made in (
                haproxy(tmp),
                pgbouncer(tmp),
                relay(tmp),
                sidecar(tmp, policies, audit_all=False),
                None if args.no_audit_all else sidecar(tmp, policies, audit_all=True),
                None
                if args.baseline is None
                else sidecar(tmp, policies, audit_all=False, source=args.baseline.resolve()),
            ):
                if made is not None:
                    targets.append(made)
            for target in targets:
                if target.name.startswith("sidecar"):
                    check_policy_active(target)
            flush()
            amount = Amount(args.duration, args.transactions)
            runs = measure(targets, amount, args.repeat, tmp, modes)
        finally:
            for target in targets:
                stop(target)
            drop_db()
    load = os.getloadavg()
    print(f"load average after the runs {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    medians = {m: {n: median(rs) for n, rs in runs[m].items()} for m in modes}
    for mode in modes:
        report(mode, medians[mode])
    return 0 if verdicts(medians) else 1


if __name__ == "__main__":
    sys.exit(main())
