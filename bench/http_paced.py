"""The fixed-load half of the HTTP sidecar benchmark (`http_sidecar.py`): `http_load.py`, the
open-loop generator, through each path at a fixed rate in short interleaved slices (so a
burst of other work on the machine lands on every path, not on one); the slices' samples
pooled per path, with the proxy's CPU per request; the table, and a judgement of the
generator's own accuracy (achieved rate, send lag)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Target, cpu_ticks, cpu_us, flush, ordered, percentile, table

HERE = Path(__file__).resolve().parent
# The generator is trusted when it keeps the asked rate and sends on time: a p99 send lag
# under 1 ms is half the added-p99 budget, and it is in the direct baseline too.
MIN_ACHIEVED_SHARE, MAX_SEND_LAG_P99_MS = 0.99, 1.0
PACED_KEYS = {"latency_us", "lag_us", "sent_with_warmup", "achieved_rate", "queued", "errors"}


@dataclass(frozen=True)
class Paced:
    """The open-loop runs of `http_load.py` at a fixed rate through one path, pooled."""

    achieved: float  # requests sent per second
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    lag_p50_ms: float  # send time - due time: the generator's own accuracy
    lag_p99_ms: float
    queued: int  # requests that came due while every connection was busy
    generator_cpu_pct: float
    timer: str
    scheduling: str  # the generator's: "fifo" (real-time priority) or "normal"
    errors: int
    problem: str
    cpu_us: float | None  # proxy CPU per request; None for direct


def paced_slice(
    target: Target, rate: float, seconds: float, connections: int
) -> dict[str, Any] | None:
    """One short open-loop run of `http_load.py` through `target`, with its raw samples."""
    argv = [sys.executable, str(HERE / "http_load.py"), f"127.0.0.1:{target.port}", "--json"]
    argv += ["--samples", "--rate", str(rate), "--duration", str(seconds), "--warmup", "0.5"]
    argv += ["--connections", str(connections)]
    before = cpu_ticks(target)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    ticks = cpu_ticks(target) - before
    try:
        got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        got = {}
    if not isinstance(got, dict) or not got.keys() >= PACED_KEYS:
        print(f"  http_load via {target.name} failed: {(out.stderr or out.stdout)[-400:]}")
        return None
    got["cpu_ticks"] = ticks
    return got


def fixed_load(
    targets: list[Target], rate: float, seconds: float, connections: int, slices: int
) -> dict[str, Paced]:
    """Each path at `rate` for `seconds` in all, in `slices` interleaved runs (in a new
    order each time), so a burst of other work on the machine lands on every path, not on
    one."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for r in range(slices):
        for target in ordered(targets, r):
            got = paced_slice(target, rate, seconds / slices, connections)
            if got is not None:
                runs[target.name].append(got)
        line = (
            f"{n} p99 {percentile(rs[-1]['latency_us'] or [0], 0.99) / 1000:.2f} ms"
            for n, rs in runs.items()
            if rs
        )
        print(f"  {rate:.0f} req/s, slice {r + 1}/{slices}: " + ", ".join(line))
        flush()
    return {t.name: _pooled(t, runs[t.name]) for t in targets if runs[t.name]}


def _pooled(target: Target, runs: list[dict[str, Any]]) -> Paced:
    latency = sorted(x for r in runs for x in r["latency_us"]) or [0]
    lag = sorted(x for r in runs for x in r["lag_us"]) or [0]
    sent = sum(int(r["sent_with_warmup"]) for r in runs)  # the warm-up went through it too
    ticks = sum(int(r["cpu_ticks"]) for r in runs)
    return Paced(
        achieved=min(float(r["achieved_rate"]) for r in runs),
        p50_ms=percentile(latency, 0.5) / 1000,
        p99_ms=percentile(latency, 0.99) / 1000,
        p999_ms=percentile(latency, 0.999) / 1000,
        max_ms=latency[-1] / 1000,
        lag_p50_ms=percentile(lag, 0.5) / 1000,
        lag_p99_ms=percentile(lag, 0.99) / 1000,
        queued=sum(int(r["queued"]) for r in runs),
        generator_cpu_pct=max(float(r["generator_cpu_pct"]) for r in runs),
        timer=str(runs[0]["timer"]),
        scheduling=str(runs[0]["scheduling"]),
        errors=sum(int(r["errors"]) for r in runs),
        problem="; ".join(sorted({str(r["problem"]) for r in runs if r["problem"]})),
        cpu_us=cpu_us(target, ticks, sent),
    )


def report_latency(results: dict[str, Paced], rate: float) -> bool:
    """Print the fixed-load table and the generator's accuracy; True if it paced well."""
    base = results["direct"]
    rows = [
        (
            name,
            f"{r.achieved:.0f}",
            f"{r.p50_ms:.3f}",
            f"{r.p99_ms:.3f}",
            f"{r.p999_ms:.3f}",
            f"{r.max_ms:.2f}",
            f"{r.p99_ms - base.p99_ms:+.3f}",
            f"{r.lag_p99_ms:.3f}",
            r.queued,
            f"{r.cpu_us:.1f}" if r.cpu_us is not None else "-",
            r.errors,
        )
        for name, r in results.items()
    ]
    print(f"\nopen loop at {rate:.0f} req/s (http_load.py; latency from the due time)\n")
    headers = ("path", "sent/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "+p99 ms")
    print(table((*headers, "lag p99 ms", "queued", "CPU µs/req", "errors"), rows))
    for name, r in results.items():
        if r.problem:
            print(f"  {name}: {r.problem}")
    print(
        f"generator (direct run): {base.achieved:.0f} of {rate:.0f} req/s sent, send lag p50 "
        f"{base.lag_p50_ms:.3f} ms p99 {base.lag_p99_ms:.3f} ms, "
        f"{base.generator_cpu_pct:.0f}% of a core, timer: {base.timer}, scheduling: "
        f"{base.scheduling}"
    )
    accurate = base.achieved >= MIN_ACHIEVED_SHARE * rate and base.lag_p99_ms <= MAX_SEND_LAG_P99_MS
    if not accurate:
        print(
            "  WARNING: Python could not pace this rate accurately on this machine (wanted "
            f">= {MIN_ACHIEVED_SHARE:.0%} of the rate and send lag p99 <= {MAX_SEND_LAG_P99_MS} "
            "ms); the latencies above include the generator's own delay"
        )
    return accurate
