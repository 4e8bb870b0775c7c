"""CLI commands that go through the control API: policy apply|list|show|diff|rollback,
audit query|tail, stats, sidecars, token create|list|delete.

Results go to stdout (tables, or JSON with --json), summaries and errors to stderr. Exit 1
when the control plane refuses or cannot be reached, with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from mesh.client import Control, ControlError, Unreachable, add_connection_args
from mesh.policy_files import read_policy_set
from policies.errors import PolicyError

EXIT_OK, EXIT_FAILED = 0, 1
FILTERS = ("since", "until", "app", "instance", "service", "decision", "verb", "table", "rule")
GROUPS = "app, instance, service, verb, decision, rule, table"
Command = Callable[[Control, argparse.Namespace], int]


def add_policy_parsers(psub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _cmd(psub, "apply", "validate and apply policy files as a new version", _apply)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--comment", default="")
    _cmd(psub, "list", "policy versions, newest first", _list)
    p = _cmd(psub, "show", "the files of a version (default: current)", _show)
    p.add_argument("version", nargs="?", type=int)
    p = _cmd(psub, "diff", "unified diff between two versions", _diff)
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    p = _cmd(psub, "rollback", "make a new version equal to VERSION", _rollback)
    p.add_argument("version", type=int)
    p.add_argument("--comment", default="")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="query and follow the audit trail")
    asub = audit.add_subparsers(title="audit commands", metavar="SUBCOMMAND")
    audit.set_defaults(run=_usage(audit))
    p = _cmd(asub, "query", "audit events, newest first", _query)
    _filters(p)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--cursor", help="continue from a previous query's next cursor")
    p = _cmd(asub, "tail", "follow audit events as they arrive (Ctrl-C stops)", _tail)
    _filters(p)
    p = _cmd(sub, "stats", "decisions per group over a window", _stats)
    _filters(p)
    p.add_argument("--window", default="5m", help="e.g. 30s, 5m, 1h (default 5m)")
    p.add_argument("--group-by", default="", metavar="FIELDS", help=f"comma list of {GROUPS}")
    _cmd(sub, "sidecars", "registered sidecars and whether they are stale", _sidecars)
    token = sub.add_parser("token", help="API tokens")
    tsub = token.add_subparsers(title="token commands", metavar="SUBCOMMAND")
    token.set_defaults(run=_usage(token))
    p = _cmd(tsub, "create", "create a token (shown once)", _token_create)
    p.add_argument("--role", required=True, choices=("admin", "sidecar", "reader"))
    p.add_argument("--name", required=True)
    _cmd(tsub, "list", "tokens (never their secrets)", _token_list)
    p = _cmd(tsub, "delete", "delete a token by id", _token_delete)
    p.add_argument("id")


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return run


def _cmd(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, fn: Command
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--json", action="store_true", help="JSON output")
    add_connection_args(p)
    p.set_defaults(run=lambda args: _run(fn, args))
    return p


def _filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters")
    for name in FILTERS:
        g.add_argument(f"--{name}", help="unix seconds or ISO 8601" if "i" in name[:2] else None)
    g.add_argument("--text", dest="q", metavar="TEXT", help="substring of the statement")


def _run(fn: Command, args: argparse.Namespace) -> int:
    try:
        with Control.from_args(args) as control:
            return fn(control, args)
    except Unreachable as exc:
        print(f"sluice: {exc}", file=sys.stderr)
    except ControlError as exc:
        for p in exc.problems:
            print(f"{p.get('file')}:{p.get('line')}:{p.get('column')}: {p.get('message')}")
        hint = ""
        if exc.status == 401:
            hint = " (give --token, SLUICE_TOKEN, or the --data-dir holding admin.token)"
        print(f"sluice: {exc}{hint}", file=sys.stderr)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_FAILED


def _filter_params(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in (*FILTERS, "q")}


def _apply(c: Control, args: argparse.Namespace) -> int:
    try:
        files = read_policy_set(args.paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s); nothing applied", file=sys.stderr)
        return EXIT_FAILED
    info = c.call("POST", "/v1/policies", body={"files": files, "comment": args.comment})
    if args.json:
        print(json.dumps(info))
    else:
        print(
            f"version {info['version']}: {len(info['files'])} files, "
            f"{info['policies']} policies, {info['rules']} rules"
        )
    return EXIT_OK


def _list(c: Control, args: argparse.Namespace) -> int:
    answer = c.call("GET", "/v1/policies")
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    rows = [
        [
            f"{v['version']}{' *' if v['version'] == answer['current'] else ''}",
            _when(v["created"]),
            v["author"],
            str(v["policies"]),
            str(v["rules"]),
            ", ".join(v["files"]),
            v["comment"],
        ]
        for v in answer["versions"]
    ]
    _table(["VERSION", "CREATED", "AUTHOR", "POLICIES", "RULES", "FILES", "COMMENT"], rows)
    return EXIT_OK


def _show(c: Control, args: argparse.Namespace) -> int:
    path = "/v1/policies/current" if args.version is None else f"/v1/policies/{args.version}"
    answer = c.call("GET", path)
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    print(f"# version {answer['version']}: {answer['comment']}", file=sys.stderr)
    for name, text in answer["files"].items():
        print(f"# file: {name}")
        print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


def _diff(c: Control, args: argparse.Namespace) -> int:
    answer = c.call("GET", f"/v1/policies/{args.a}/diff/{args.b}")
    print(json.dumps(answer) if args.json else answer["diff"], end="" if not args.json else "\n")
    return EXIT_OK


def _rollback(c: Control, args: argparse.Namespace) -> int:
    body = {"version": args.version, "comment": args.comment}
    info = c.call("POST", "/v1/policies/rollback", body=body)
    print(json.dumps(info) if args.json else f"version {info['version']}: {info['comment']}")
    return EXIT_OK


def _query(c: Control, args: argparse.Namespace) -> int:
    params = {**_filter_params(args), "limit": args.limit, "cursor": args.cursor}
    answer = c.call("GET", "/v1/audit/events", params=params)
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    _events(answer["events"])
    if answer["next_cursor"]:
        print(f"more: --cursor {answer['next_cursor']}", file=sys.stderr)
    return EXIT_OK


def _tail(c: Control, args: argparse.Namespace) -> int:
    for line in c.lines("/v1/audit/stream", _filter_params(args)):
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if args.json:
                print(json.dumps(event), flush=True)
            elif "dropped" in event and "id" not in event:
                print(f"({event['dropped']} events dropped: reader too slow)", flush=True)
            else:
                print("  ".join(_event_row(event)), flush=True)
    return EXIT_OK


def _stats(c: Control, args: argparse.Namespace) -> int:
    params = {**_filter_params(args), "window": args.window, "group_by": args.group_by}
    answer = c.call("GET", "/v1/stats", params=params)
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    keys = [g.strip() for g in args.group_by.split(",") if g.strip()]
    rows = [
        [*(str(g["key"].get(k)) for k in keys), str(g["count"]), f"{g['per_second']:.3f}"]
        for g in answer["groups"]
    ]
    _table([*(k.upper() for k in keys), "COUNT", "PER_SECOND"], rows)
    print(f"window {answer['window']:g}s ending {_when(answer['until'])}", file=sys.stderr)
    return EXIT_OK


def _sidecars(c: Control, args: argparse.Namespace) -> int:
    answer = c.call("GET", "/v1/sidecars")
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    rows = [
        [
            s.get("instance", ""),
            s.get("app", ""),
            s.get("hostname", ""),
            str(s.get("policy_version", "")),
            ", ".join(f"{r.get('service')}@{r.get('listen')}" for r in s.get("routes", [])),
            _when(s["last_seen"]),
            "stale" if s["stale"] else "ok",
        ]
        for s in answer["sidecars"]
    ]
    _table(["INSTANCE", "APP", "HOST", "POLICY", "ROUTES", "LAST_SEEN", "STATE"], rows)
    return EXIT_OK


def _token_create(c: Control, args: argparse.Namespace) -> int:
    answer = c.call("POST", "/v1/tokens", body={"role": args.role, "name": args.name})
    if args.json:
        print(json.dumps(answer))
    else:
        print(answer["token"])
        print(
            f"{answer['role']} token {answer['id']} ({answer['name']}): shown once", file=sys.stderr
        )
    return EXIT_OK


def _token_list(c: Control, args: argparse.Namespace) -> int:
    answer = c.call("GET", "/v1/tokens")
    if args.json:
        print(json.dumps(answer))
        return EXIT_OK
    rows = [[t["id"], t["role"], t["name"], _when(t["created"])] for t in answer["tokens"]]
    _table(["ID", "ROLE", "NAME", "CREATED"], rows)
    return EXIT_OK


def _token_delete(c: Control, args: argparse.Namespace) -> int:
    answer = c.call("DELETE", f"/v1/tokens/{args.id}")
    print(json.dumps(answer) if args.json else f"deleted {answer['deleted']}")
    return EXIT_OK


def _events(events: Sequence[dict[str, Any]]) -> None:
    head = ["TIME", "APP", "INSTANCE", "SERVICE", "DECISION", "VERBS", "TABLES", "RULE"]
    _table([*head, "STATEMENT"], [_event_row(e) for e in events])


def _event_row(e: dict[str, Any]) -> list[str]:
    statement = e.get("statement", "")
    return [
        _when(e["time"]),
        e["app"],
        e["instance"],
        e["service"],
        e["decision"],
        ",".join(e.get("verbs", [])),
        ",".join(e.get("tables", [])),
        e.get("rule") or "-",
        statement if len(statement) <= 80 else statement[:77] + "...",
    ]


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    for row in [head, *rows]:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())
