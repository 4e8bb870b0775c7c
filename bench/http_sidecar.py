"""HTTP sidecar throughput and latency: wrk through the sidecar and its peers, in one run.

The origin is nginx serving a 612-byte static file (one worker, no access log): the fastest
origin there is, so what a proxy costs shows. Paths: direct; HAProxy in HTTP mode (one
thread, keep-alive both sides); nginx as a reverse proxy (one worker, upstream keep-alive);
a bare uvloop TCP relay (`relay.py`, the ceiling for any Python proxy: it parses nothing);
mitmproxy in reverse mode (the Python HTTP proxy people know); and `sluice sidecar
--protocol http` with 22 HTTP rules on the destination (methods, path and host globs,
headers, limits, time windows, dry runs; none denies the benchmark's GET /index.html), audit
of non-allow decisions.

1. Throughput: `wrk -t2 -c32 --latency` against each path in turn (a new order each round; `--repeat
   N` takes medians over N rounds): requests/s, ratios to direct and to HAProxy, p50/p99,
   and the proxy's CPU time per request (utime + stime of its process tree, /proc/PID/stat).
2. Latency at a fixed load: `http_load.py`, an open-loop generator (requests due on a
   schedule, latency from the due time), at --rate requests/s for direct, HAProxy, the relay
   and the sidecar: p50, p99, p99.9, the p99 each proxy adds to direct, and its CPU per
   request at that load. The paths take turns in `--latency-slices` short runs whose samples
   are pooled. The generator's own accuracy (achieved rate, send lag) is printed and judged.

Targets (issue 6): the sidecar keeps at least 0.6x HAProxy's requests/s in the same run, and
adds under 2 ms to p99 at 2,000 requests/s. Exit status 1 when either is missed (or the
sidecar cannot run). Needs nginx and wrk (`make bench-deps`); HAProxy, the relay and
mitmproxy rows are skipped with a message where absent. mitmproxy's pinned h11 clashes with
ours, so it lives in its own virtualenv: `.venv-mitm/bin/mitmdump` (`make mitm`), else
`mitmdump` on PATH.

    .venv/bin/python bench/http_sidecar.py [--duration 10] [--connections 32] [--threads 2]
        [--modes direct,haproxy,nginx,relay,mitmproxy,sidecar] [--rate 2000]
        [--latency-duration 10] [--latency-modes direct,haproxy,relay,sidecar]
        [--latency-slices 5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import http.client
import re
import signal
import subprocess
import sys
from pathlib import Path

from common import (
    SLUICE,
    Run,
    Target,
    check,
    comparison,
    cpu_ticks,
    cpu_us,
    flush,
    measure,
    proxy_run,
    relay,
    sidecar,
    started,
    tool_missing,
    write_policy_file,
)
from http_paced import Paced, fixed_load, report_latency
from http_peers import INDEX_BYTES, PATH, haproxy_http, mitmproxy, nginx_proxy, origin

MODES = ("direct", "haproxy", "nginx", "relay", "mitmproxy", "sidecar")
LATENCY_MODES = ("direct", "haproxy", "relay", "sidecar")
MIN_SHARE_OF_HAPROXY = 0.6
MAX_ADDED_P99_MS = 2.0


# --- the policy set -------------------------------------------------------------------------


def web_policy() -> str:
    """22 HTTP rules on `web`, what a real API guard holds; only `public-static` (allow)
    matches the benchmark's GET /index.html."""
    rules = [
        "{name: no-admin, http: {paths: ['/admin/**']}, action: deny, message: the admin API is not reachable from apps}",
        "{name: no-trace-connect, http: {methods: [TRACE, CONNECT]}, action: deny}",
        "{name: internal-hosts, http: {hosts: ['*.internal', 'metadata.*']}, action: deny}",
        "{name: no-debug-header, http: {headers: {x-debug: ['*']}}, action: deny}",
        "{name: no-method-override, http: {headers: {x-http-method-override: [DELETE, PUT]}}, action: deny}",
        "{name: old-clients, http: {headers: {user-agent: ['python-requests/1.*', 'curl/7.1*']}}, action: deny}",
        "{name: no-dotfiles, http: {paths: ['/**/.git/**', '/**/.env']}, action: deny}",
        "{name: legacy-api-gone, http: {paths: ['/v0/**']}, action: deny, message: API v0 was retired}",
        "{name: reporting-payments-read-only, from: [reporting], http: {methods: [POST, PUT, PATCH, DELETE], paths: ['/v1/payments/**']}, action: deny}",
        "{name: payments-writes, http: {methods: [POST, PUT, PATCH, DELETE], paths: ['/v1/payments/**']}, action: audit}",
        "{name: orders-writes, from: [reporting, analytics], http: {methods: [POST, PUT, PATCH, DELETE], paths: ['/v1/orders/**']}, action: deny}",
        "{name: refunds-budget, http: {methods: [POST], paths: ['/v1/refunds/**']}, action: limit, limit: {rate: 20}}",
        "{name: search-budget, http: {methods: [GET], paths: ['/v1/search/**', '/v2/search/**']}, action: limit, limit: {rate: 1000, burst: 2000}}",
        "{name: exports-budget, from: [analytics, 'batch-*'], http: {paths: ['/v1/exports/**']}, action: limit, limit: {rate: 5, per: 1m}}",
        "{name: deletes-at-night, http: {methods: [DELETE]}, when: {time: '22:00-06:00'}, action: deny}",
        "{name: weekend-migrations, http: {methods: [POST], paths: ['/v1/migrations/**']}, when: {time: '00:00-23:59', days: [sat, sun]}, action: deny}",
        "{name: batch-daytime-writes, from: ['batch-*'], http: {methods: [POST, PUT]}, when: {time: '08:00-18:00', days: [mon, tue, wed, thu, fri]}, action: deny}",
        "{name: users-pii, from: [web, reporting], http: {methods: [GET], paths: ['/v1/users/*/pii', '/v1/users/*/documents/**']}, action: audit}",
        "{name: webhooks, http: {hosts: ['hooks.*'], paths: ['/v1/webhooks/**']}, action: audit}",
        "{name: dry-run-bulk, http: {methods: [POST], paths: ['/v1/bulk/**']}, action: deny, enforce: false}",
        "{name: dry-run-graphql-mutations, http: {methods: [POST], paths: [/graphql], headers: {x-operation-type: [mutation]}}, action: deny, enforce: false}",
        "{name: public-static, http: {methods: [GET, HEAD], paths: ['/', '/*.html', '/static/**', '/assets/**']}, action: allow}",
    ]
    head = (
        "apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: web-bench}\n"
        "spec:\n  destination: web\n  timezone: UTC\n  rules:\n"
    )
    return head + "".join(f"    - {r}\n" for r in rules)


# --- the sidecar ----------------------------------------------------------------------------


def sidecar_missing() -> str:
    """Why `sluice sidecar --protocol http` cannot run, or "" when it can."""
    if not SLUICE.is_file():
        return f"{SLUICE} not found (make install)"
    out = subprocess.run(
        [str(SLUICE), "sidecar", "--help"], capture_output=True, text=True, timeout=60
    )
    choices = re.search(r"--protocol \{([^}]*)\}", out.stdout)
    if choices is None or "http" not in choices.group(1).split(","):
        found = choices.group(1) if choices else "none listed"
        return f"`sluice sidecar --protocol http` does not exist yet (--protocol: {found})"
    return ""


def start_sidecar(tmp: Path, up: int) -> Target | None:
    missing = sidecar_missing()
    if missing:
        print(f"sidecar: {missing}; its rows skipped and its targets missed")
        return None
    policies = write_policy_file(tmp, web_policy())
    return sidecar(tmp, policies, ("127.0.0.1", up), service="web", protocol="http")


def denied_status(target: Target) -> int:
    """The status of a request the policy set denies (GET /admin/users), through `target`."""
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    try:
        conn.request("GET", "/admin/users")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


# --- measuring ------------------------------------------------------------------------------


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(target: Target, seconds: float, threads: int, connections: int) -> Run:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    argv += ["--latency", "--timeout", "5s", f"http://127.0.0.1:{target.port}{PATH}"]
    before = cpu_ticks(target)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    ticks = cpu_ticks(target) - before
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    lat = dict(re.findall(r"^\s*(50|99)%\s+([\d.]+\w+)\s*$", text, re.MULTILINE))
    if out.returncode != 0 or rps is None or total is None:
        print(f"  wrk via {target.name} exited {out.returncode}: {(out.stderr or text)[-400:]}")
        return Run(0.0, 0, 0, None)
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())

    def quantile(q: str) -> float:
        match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", lat.get(q, "0us"))
        return _ms(*match.groups()) if match else 0.0

    requests = int(total.group(1))
    return Run(
        rate=float(rps.group(1)),
        count=requests,
        errors=errors,  # non-2xx/3xx responses and socket errors
        cpu_us=cpu_us(target, ticks, requests),
        p50_ms=quantile("50"),
        p99_ms=quantile("99"),
    )


def throughput(
    targets: list[Target], seconds: float, threads: int, connections: int, repeat: int
) -> dict[str, Run]:
    """Medians over `repeat` rounds; the order of paths changes from one round to the next."""
    return measure(
        targets,
        ("wrk",),
        repeat,
        lambda target, _, __: wrk(target, seconds, threads, connections),
        warm_up=lambda target: wrk(target, 1, threads, connections),
        progress=lambda _, target, run: (
            f"{target.name:10} {run.rate:9.0f} req/s  p99 {run.p99_ms:.2f} ms"
        ),
    )["wrk"]


# --- the report -----------------------------------------------------------------------------


def report_throughput(results: dict[str, Run], threads: int, connections: int) -> None:
    columns = [
        ("p50 ms", lambda run: f"{run.p50_ms:.3f}"),
        ("p99 ms", lambda run: f"{run.p99_ms:.3f}"),
    ]
    print(f"\nwrk -t{threads} -c{connections} GET {PATH} ({INDEX_BYTES} bytes), nginx origin\n")
    print(comparison(results, "haproxy", "req/s", columns, cpu="CPU µs/req"))


def verdicts(
    tput: dict[str, Run],
    lat: dict[str, Paced],
    rate: float,
    denied: int | None,
    modes: set[str],
) -> bool:
    print("\nTargets (sidecar, 22 HTTP rules, audit non-allow):")
    side, peer = tput.get("sidecar"), tput.get("haproxy")
    if "sidecar" not in modes:
        print("  none checked: sidecar is not among --modes")
        return True
    if side is None:
        return check("sidecar ran", False, "it did not start (see above)")
    ok = True
    if peer is None or not peer.rate:
        ok = check(f"req/s >= {MIN_SHARE_OF_HAPROXY}x haproxy", False, "haproxy did not run")
    else:
        share = side.rate / peer.rate
        detail = f"{share:.2f}x ({side.rate:.0f} vs {peer.rate:.0f})"
        ok = check(
            f"req/s >= {MIN_SHARE_OF_HAPROXY}x haproxy", share >= MIN_SHARE_OF_HAPROXY, detail
        )
    s_lat, d_lat = lat.get("sidecar"), lat.get("direct")
    label = f"added p99 at {rate:.0f} req/s < {MAX_ADDED_P99_MS:.0f} ms"
    if s_lat is None or d_lat is None:
        ok = check(label, False, "not measured") and ok
    else:
        added = s_lat.p99_ms - d_lat.p99_ms
        detail = f"{added:+.3f} ms ({s_lat.p99_ms:.3f} vs {d_lat.p99_ms:.3f})"
        ok = check(label, added < MAX_ADDED_P99_MS, detail) and ok
    errors = side.errors + (s_lat.errors if s_lat else 0)
    ok = check("no errors through the sidecar", errors == 0, str(errors)) and ok
    return (
        check("policy set active: GET /admin/users denied", denied == 403, f"status {denied}")
        and ok
    )


# --- the run --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--modes", default=",".join(MODES), help="paths, comma-separated")
    parser.add_argument("--rate", type=float, default=2000, help="fixed load, requests/s")
    parser.add_argument("--latency-duration", type=float, default=10, help="seconds at --rate")
    parser.add_argument("--latency-modes", default=",".join(LATENCY_MODES))
    parser.add_argument(
        "--latency-slices", type=int, default=5, help="interleaved runs per path at --rate"
    )
    parser.add_argument("--repeat", type=int, default=1, help="throughput rounds (medians)")
    args = parser.parse_args()
    modes = {m for m in args.modes.split(",") if m} | {"direct"}  # direct: the baseline
    latency_modes = [m for m in args.latency_modes.split(",") if m]
    if modes - set(MODES) or set(latency_modes) - set(MODES):
        parser.error(f"--modes, --latency-modes: choose from {', '.join(MODES)}")
    if not 1 <= args.repeat <= 20 or not 1 <= args.latency_slices <= 50:
        parser.error("--repeat 1..20, --latency-slices 1..50")
    if min(args.duration, args.rate, args.latency_duration) <= 0:
        parser.error("--duration, --rate and --latency-duration > 0")
    if tool_missing(("wrk", "nginx"), " (make bench-deps: nginx-light, wrk)"):
        return 0
    # Ctrl-C raises KeyboardInterrupt; make SIGTERM unwind through the same finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    targets: list[Target] = []
    denied: int | None = None
    with proxy_run("sluice-http-bench-", targets) as tmp:
        base = origin(tmp)
        if base is None:
            return 1
        targets.append(base)
        makers = {
            "haproxy": haproxy_http,
            "nginx": nginx_proxy,
            "relay": lambda tmp, up: relay(tmp, ("127.0.0.1", up)),
            "mitmproxy": mitmproxy,
            "sidecar": start_sidecar,
        }
        for mode in MODES[1:]:  # each in `targets` as soon as it runs, to be stopped
            targets += started(makers[mode](tmp, base.port) if mode in modes else None)
        for target in targets:
            if target.name == "sidecar":
                denied = denied_status(target)
                print(f"sidecar: GET /admin/users -> {denied} (403 expected: rule no-admin)")
        flush()
        tput = throughput(targets, args.duration, args.threads, args.connections, args.repeat)
        paced = [t for t in targets if t.name in latency_modes]
        lat = fixed_load(
            paced, args.rate, args.latency_duration, args.connections, args.latency_slices
        )
    report_throughput(tput, args.threads, args.connections)
    if "direct" in lat:
        report_latency(lat, args.rate)
    return 0 if verdicts(tput, lat, args.rate, denied, modes) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the finally blocks have stopped every process by now
        print("interrupted")
        sys.exit(130)
