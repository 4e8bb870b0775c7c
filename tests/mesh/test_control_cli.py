"""The CLI commands that go through the control API, against a real `sluice up`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx

from tests.mesh.conftest import SLUICE, ControlPlane, cli, policy_text
from tests.mesh.test_api_audit import T0, event, ingest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = str(REPO / "examples" / "policies")


def test_policy_apply_list_show_diff_rollback(control: ControlPlane, tmp_path: Path) -> None:
    r = cli(control, "policy", "apply", EXAMPLES, "--comment", "from the cli")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(": 2 files, 3 policies, 6 rules\n")
    v = int(r.stdout.split()[1].rstrip(":"))
    one = tmp_path / "one.yaml"
    one.write_text(policy_text("cli"))
    assert cli(control, "policy", "apply", str(one)).returncode == 0

    r = cli(control, "policy", "list")
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "VERSION",
        "CREATED",
        "AUTHOR",
        "POLICIES",
        "RULES",
        "FILES",
        "COMMENT",
    ]
    assert lines[1].startswith(f"{v + 1} *") and "one.yaml" in lines[1]
    assert lines[2].startswith(f"{v} ") and "from the cli" in lines[2]
    listed = json.loads(cli(control, "policy", "list", "--json").stdout)
    assert listed["current"] == v + 1

    r = cli(control, "policy", "show")
    assert r.stdout == f"# file: one.yaml\n{policy_text('cli')}"
    shown = json.loads(cli(control, "policy", "show", str(v), "--json").stdout)
    assert sorted(shown["files"]) == ["orders-db.yaml", "payments.yaml"]
    r = cli(control, "policy", "diff", str(v), str(v + 1))
    assert "--- a/orders-db.yaml\n+++ /dev/null\n" in r.stdout and "+++ b/one.yaml" in r.stdout

    r = cli(control, "policy", "rollback", str(v))
    assert r.stdout == f"version {v + 2}: rollback to version {v}\n"
    assert cli(control, "policy", "show", "99999").returncode == 1


def test_policy_apply_rejects_with_file_line_column(control: ControlPlane, tmp_path: Path) -> None:
    before = cli(control, "policy", "list", "--json").stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy_text().replace("verbs: [DROP]", "verbz: [DROP]"))
    r = cli(control, "policy", "apply", str(bad))
    assert r.returncode == 1
    assert r.stdout.startswith("bad.yaml:8:")
    assert "422 invalid policies" in r.stderr
    assert cli(control, "policy", "list", "--json").stdout == before


def test_check_and_explain_still_work_offline(tmp_path: Path) -> None:
    env = dict(os.environ, SLUICE_CONTROL="http://127.0.0.1:9")
    r = subprocess.run(
        [SLUICE, "policy", "check", EXAMPLES], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0 and r.stderr.startswith("ok: ")


def test_unreachable_control_plane() -> None:
    env = dict(os.environ, SLUICE_CONTROL="http://127.0.0.1:9", SLUICE_TOKEN="x")
    r = subprocess.run(
        [SLUICE, "policy", "list"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 1
    assert r.stderr.startswith("sluice: cannot reach the control plane at http://127.0.0.1:9: ")


def test_bad_token_says_how_to_give_one(control: ControlPlane) -> None:
    r = cli(control, "sidecars", token="sluice_wrong")
    assert r.returncode == 1 and "401 unauthorized: unknown token" in r.stderr
    assert "--token" in r.stderr


def test_token_from_the_data_dir(control: ControlPlane) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLUICE_TOKEN"}
    r = subprocess.run(
        [SLUICE, "token", "list", "--control", control.url, "--data-dir", str(control.data_dir)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["ID", "ROLE", "NAME", "CREATED"]


def test_audit_query_stats_and_tail(control: ControlPlane, admin: httpx.Client) -> None:
    evs = [event(n, "cli", verbs=["INSERT"] if n % 2 else ["SELECT"]) for n in range(10)]
    ingest(admin, evs)
    r = cli(control, "audit", "query", "--app", "cli-billing", "--verb", "INSERT", "--limit", "3")
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["TIME", "APP", "INSTANCE", "SERVICE", "DECISION"]
    assert len(lines) == 4 and all("INSERT" in line for line in lines[1:])
    assert r.stderr.startswith("more: --cursor ")
    got = json.loads(cli(control, "audit", "query", "--app", "cli-billing", "--json").stdout)
    assert [e["id"] for e in got["events"]] == [f"cli-{n}" for n in range(9, -1, -1)]

    r = cli(
        control, "stats", "--app", "cli-billing", "--window", "10s",
        "--until", str(T0 + 10), "--group-by", "verb",
    )  # fmt: skip
    assert r.stdout.splitlines() == [
        "VERB    COUNT  PER_SECOND",
        "INSERT  5      0.500",
        "SELECT  5      0.500",
    ]

    env = dict(os.environ, SLUICE_CONTROL=control.url, SLUICE_TOKEN=control.admin_token)
    tail = subprocess.Popen(
        [SLUICE, "audit", "tail", "--app", "cli-billing", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = 50
        while deadline and not admin.get("/v1/status").json()["stream_subscribers"]:
            deadline -= 1
            subprocess.run(["sleep", "0.1"], check=True)
        ingest(admin, [event(50, "cli")])
        assert tail.stdout is not None
        assert json.loads(tail.stdout.readline())["id"] == "cli-50"
    finally:
        tail.terminate()
        tail.communicate(timeout=10)


def test_sidecars_and_token_create(control: ControlPlane, admin: httpx.Client) -> None:
    admin.put(
        "/v1/sidecars/cli@h",
        json={"app": "cli", "routes": [{"service": "db", "listen": "127.0.0.1:1"}]},
    )
    r = cli(control, "sidecars")
    assert r.stdout.splitlines()[0].split() == [
        "INSTANCE",
        "APP",
        "HOST",
        "POLICY",
        "ROUTES",
        "LAST_SEEN",
        "STATE",
    ]
    assert any(
        line.startswith("cli@h") and "db@127.0.0.1:1" in line for line in r.stdout.splitlines()
    )
    r = cli(control, "token", "create", "--role", "sidecar", "--name", "billing")
    assert r.returncode == 0 and r.stdout.startswith("sluice_") and "shown once" in r.stderr
    with control.client(r.stdout.strip()) as c:
        assert c.get("/v1/sidecar/policies").status_code == 200
        assert c.get("/v1/audit/events").status_code == 403
