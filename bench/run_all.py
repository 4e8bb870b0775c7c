"""Run every benchmark in this folder, one after another, and report which met its targets.

python bench/run_all.py      (or: make bench)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = (
    "decision_latency.py",
    "pg_corpus_accuracy.py",
    "mysql_corpus_accuracy.py",
    "pg_sidecar.py",
    "mysql_sidecar.py",
    "http_sidecar.py",
    "control_plane.py",
    "quota.py",
    "dns.py",
)


def main() -> int:
    failed = []
    for name in BENCHES:
        path = HERE / name
        if not path.is_file():
            continue
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(path)], check=False).returncode != 0:
            failed.append(name)
    print(
        f"\n{len(BENCHES) - len(failed)} benchmarks met their targets; missed: {', '.join(failed) or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
