"""meshdns against dnsmasq, one run, same 50 names: queries per second and p99 latency.

Both answer NAME.service.consul for 50 services (meshdns from a catalog file, dnsmasq from a
hosts file). dnsperf (Debian) drives each: first unthrottled for throughput, then at 5,000
q/s with per-query latencies (-v) for the p99. Prints the ratio meshdns/dnsmasq. Targets
(issue 8): at least 0.25x of dnsmasq's q/s, and p99 under 1 ms at 5,000 q/s. Skips (exit 0)
when dnsperf or dnsmasq is missing: `apt-get install dnsperf dnsmasq-base`.

On a shared 2-core machine one 8-second run's p99 is mostly the luck of that moment: other
processes' bursts, and dnsperf's own threads competing with the server for the cores, give
dnsmasq too a p99 anywhere from 0.1 to 1 ms from one run to the next. So the two servers
are measured in alternating rounds (ROUNDS of each, in turn), and the table gives the
median round and the worst one; the targets are checked on the medians. The load average
is printed before and after.
"""

from __future__ import annotations

import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import percentile, table

NAMES = 50
SECONDS = 3  # per round
ROUNDS = 5  # rounds of each kind per server, alternating meshdns and dnsmasq
PACED_QPS = 5000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def dnsperf(port: int, queries: Path, *extra: str) -> str:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(SECONDS)]
    r = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120, check=True)
    return r.stdout


def qps(out: str) -> float:
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    return float(m.group(1)) if m else 0.0


def p99_ms(out: str) -> float:
    # -v prints one line per answer: "> NOERROR NAME TYPE LATENCY-SECONDS"
    lat = [float(m.group(1)) for m in re.finditer(r"^> \w+ \S+ \S+ ([\d.]+)$", out, re.M)]
    return percentile(lat, 0.99) * 1000 if lat else float("nan")


def measure(ports: dict[str, int], queries: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Per server: q/s of each unthrottled round, p99 ms of each paced round."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in ports}
    for _ in range(ROUNDS):
        for name, port in ports.items():
            out[name][0].append(qps(dnsperf(port, queries, "-c", "4", "-q", "200")))
    time.sleep(1)  # let the saturated runs' backlog drain before timing latencies
    for _ in range(ROUNDS):
        for name, port in ports.items():
            out[name][1].append(p99_ms(dnsperf(port, queries, "-Q", str(PACED_QPS), "-v")))
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_udp(port: int) -> None:
    for _ in range(100):
        r = subprocess.run(
            ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-n", "1", "-t", "1"],
            input="svc0.service.consul A\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if "Queries completed:    1" in r.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}")


def main() -> int:
    missing = [t for t in ("dnsperf", "dnsmasq") if not shutil.which(t)]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (apt-get install dnsperf dnsmasq-base)")
        return 0
    sluice = str(Path(sys.executable).parent / "sluice")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        services = [f"svc{i}" for i in range(NAMES)]
        (d / "catalog.yaml").write_text(
            "services:\n"
            + "".join(
                f"  {s}: [{{address: 10.2.0.{i + 1}, port: 80}}]\n" for i, s in enumerate(services)
            )
        )
        (d / "hosts").write_text(
            "".join(f"10.2.0.{i + 1} {s}.service.consul\n" for i, s in enumerate(services))
        )
        (d / "queries").write_text("".join(f"{s}.service.consul A\n" for s in services))
        mport, dport = free_port(), free_port()
        procs = [
            subprocess.Popen(
                [
                    sluice,
                    "dns",
                    "--listen",
                    f"127.0.0.1:{mport}",
                    "--catalog-file",
                    str(d / "catalog.yaml"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    f"--addn-hosts={d / 'hosts'}",
                    f"--port={dport}",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--cache-size=1000",
                    "--pid-file=",
                    "--user=root",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:
            wait_udp(mport)
            wait_udp(dport)
            print(f"load average before: {loadavg()}")
            got = measure({"meshdns": mport, "dnsmasq": dport}, d / "queries")
            print(f"load average after:  {loadavg()}")
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    rows = []
    for name in ("dnsmasq", "meshdns"):
        rates, p99s = got[name]
        rows.append(
            [
                name,
                round(statistics.median(rates)),
                round(statistics.median(p99s), 3),
                round(max(p99s), 3),
                " ".join(f"{x:.2f}" for x in p99s),
            ]
        )
    print(
        table(
            ["server", "q/s (median)", f"p99 ms at {PACED_QPS} q/s (median)", "worst", "rounds"],
            rows,
        )
    )
    m_qps, d_qps = statistics.median(got["meshdns"][0]), statistics.median(got["dnsmasq"][0])
    m_p99 = statistics.median(got["meshdns"][1])
    ratio = m_qps / d_qps if d_qps else 0.0
    ok = ratio >= 0.25 and m_p99 < 1.0
    print(
        f"meshdns/dnsmasq: {ratio:.2f}x (target >= 0.25x); p99 {m_p99:.3f} ms, median of "
        f"{ROUNDS} rounds (target < 1 ms): {'met' if ok else 'missed'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
