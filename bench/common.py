"""Shared helpers for the benchmarks: bounded timing loops, percentiles and tables."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
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
