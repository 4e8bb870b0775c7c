"""The `sluice` command line, run as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = str(REPO / "examples" / "policies")
SLUICE = str(Path(sys.executable).parent / "sluice")


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SLUICE, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_check_accepts_the_examples() -> None:
    r = run("policy", "check", EXAMPLES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == "" and r.stderr.startswith("ok: ")


def test_check_reports_file_line_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  destination: db\n"
        "  rules:\n    - name: r\n      sql: {verbs: [DELETE], tabels: [t]}\n      action: deny\n"
    )
    r = run("policy", "check", str(bad), EXAMPLES)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{bad}:8:30: rule 'r': sql: unknown key 'tabels'; expected one of tables, verbs, where"
    ]
    assert "nothing accepted" in r.stderr


def test_explain_json_night_freeze() -> None:
    # 01:30 UTC on 2026-11-24 is 01:30 in London (GMT): inside the freeze.
    r = run(
        "policy",
        "explain",
        EXAMPLES,
        "--from",
        "billing",
        "--to",
        "orders-db",
        "--sql",
        "DELETE FROM orders WHERE id = 1",
        "--at",
        "2026-11-24T01:30:00Z",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["action"] == "deny" and out["enforced"] is True
    assert out["rule"] == "orders-db-guard/freeze-destructive-at-night"
    verdicts = {v["id"]: v for v in out["rules"]}
    assert verdicts["orders-db-guard/freeze-destructive-at-night"]["matched"] is True
    assert verdicts["orders-db-guard/no-unbounded-writes"]["why"].startswith("sql.where:")
    assert verdicts["orders-db-guard/billing-insert-budget"]["why"].startswith("sql.verbs:")


def test_explain_human_output_says_why() -> None:
    r = run(
        "policy",
        "explain",
        EXAMPLES,
        "--from",
        "billing",
        "--to",
        "orders-db",
        "--sql",
        "DELETE FROM orders",
        "--at",
        "2026-11-24T12:00:00",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("decision: deny (enforced)\n")
    assert "+ orders-db-guard/no-unbounded-writes [deny]: matched" in r.stdout
    assert "- orders-db-guard/freeze-destructive-at-night [deny]: when: tue 12:00" in r.stdout


def test_explain_http_dry_run() -> None:
    r = run(
        "policy",
        "explain",
        EXAMPLES,
        "--from",
        "reporting",
        "--to",
        "payments",
        "--http",
        "POST /v1/payments/7/refund?x=1",
        "--json",
    )
    out = json.loads(r.stdout)
    assert (out["action"], out["enforced"], out["applied"]) == ("deny", False, "allow")
    assert out["matched"] == ["payments-http/reporting-read-only"]


@pytest.mark.parametrize(
    "args",
    [
        ["--sql", "SELECT 1", "--at", "yesterday"],
        ["--http", "POST"],
        ["--http", "GET /", "--header", "novalue"],
    ],
)
def test_explain_bad_arguments(args: list[str]) -> None:
    r = run("policy", "explain", EXAMPLES, "--from", "a", "--to", "b", *args)
    assert r.returncode == 2 and r.stderr.startswith("sluice: --"), r.stderr


def test_no_command_prints_help() -> None:
    r = run()
    assert r.returncode == 2 and "policy" in r.stderr
