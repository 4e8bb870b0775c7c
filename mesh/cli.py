"""The `sluice` command line: policy check and explain, SQL inspection, the sidecar (`sluice
sidecar`, `sluice run`), the control plane (`sluice up`) and the commands that go through its
API (mesh/control_cmd.py).

Each subcommand is a small function from parsed arguments to an exit code; output goes to
stdout (results) and stderr (summaries and errors) so that results can be piped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from mesh import control_cmd, dns_cmd, run_cmd, sidecar_cmd, up_cmd
from policies.attributes import HttpRequest, Peer
from policies.engine import Engine, merge
from policies.errors import PolicyError
from policies.explain import Explanation, explain
from policies.loader import load_paths
from policies.sql.inspect import DIALECTS, MYSQL, POSTGRES, SessionState, split_and_inspect
from policies.sql.model import StatementInfo

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.run(args)
    except BrokenPipeError:  # `sluice sql inspect | head`: stop quietly
        return EXIT_OK
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="Sluice: a Layer-7 policy mesh.")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    policy = sub.add_parser("policy", help="validate, explain, apply and version policies")
    psub = policy.add_subparsers(title="policy commands", metavar="SUBCOMMAND")
    policy.set_defaults(run=_help(policy))

    check = psub.add_parser("check", help="validate policy files and directories")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(run=_check)

    ex = psub.add_parser("explain", help="decide one request and say why")
    ex.add_argument("paths", nargs="+", metavar="PATH")
    ex.add_argument("--from", dest="source", required=True, metavar="APP")
    ex.add_argument("--instance", default="", metavar="ID", help="source app instance")
    ex.add_argument("--to", dest="destination", required=True, metavar="SERVICE")
    what = ex.add_mutually_exclusive_group(required=True)
    what.add_argument("--sql", metavar="TEXT")
    what.add_argument("--http", metavar='"METHOD PATH"')
    ex.add_argument("--host", default="", help="HTTP Host header")
    ex.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    ex.add_argument("--dialect", choices=DIALECTS, default="postgres")
    ex.add_argument("--at", metavar="ISO-8601", help="decision time (default: now; naive = UTC)")
    ex.add_argument("--json", action="store_true", help="one JSON object")
    ex.set_defaults(run=_explain)
    control_cmd.add_policy_parsers(psub)

    sql = sub.add_parser("sql", help="SQL inspection")
    ssub = sql.add_subparsers(title="sql commands", metavar="SUBCOMMAND")
    sql.set_defaults(run=_help(sql))
    ins = ssub.add_parser("inspect", help="inspect SQL from stdin, one JSON line per statement")
    ins.add_argument("--dialect", choices=DIALECTS, default="postgres")
    ins.add_argument(
        "--json", action="store_true", help='stdin is JSON lines with key "sql" (else plain SQL)'
    )
    ins.set_defaults(run=_inspect)

    sidecar_cmd.add_parser(sub)
    dns_cmd.add_parser(sub)
    up_cmd.add_parser(sub)
    run_cmd.add_parser(sub)
    control_cmd.add_parsers(sub)
    return p


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return run


def _check(args: argparse.Namespace) -> int:
    try:
        policies = load_paths(args.paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s); nothing accepted", file=sys.stderr)
        return EXIT_INVALID
    rules = sum(len(p.rules) for p in policies)
    print(f"ok: {len(policies)} policies, {rules} rules", file=sys.stderr)
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    try:
        policies = load_paths(args.paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    try:
        now = _when(args.at)
    except ValueError as exc:
        print(f"sluice: --at: {exc}", file=sys.stderr)
        return EXIT_USAGE
    engine = Engine(policies)
    peer = Peer(args.source, args.destination, args.instance)
    requests: list[StatementInfo | HttpRequest]
    if args.sql is not None:
        state = POSTGRES if args.dialect == "postgres" else MYSQL
        requests = [st for _text, st in split_and_inspect(args.sql, state)]
        if not requests:
            requests = [StatementInfo(verb="OTHER", verbs=frozenset())]
    else:
        try:
            requests = [_http_request(args.http, args.host, args.header)]
        except ValueError as exc:
            print(f"sluice: --http: {exc}", file=sys.stderr)
            return EXIT_USAGE
    explanations = [explain(engine, peer, r, now) for r in requests]
    decision = merge([e.decision for e in explanations])
    worst = next(e for e in explanations if e.decision.applied is decision.applied)
    if args.json:
        out = decision.to_json()
        out["at"] = datetime.fromtimestamp(now, UTC).isoformat()
        out["rules"] = [v.to_json() for v in worst.verdicts]
        out["matched"] = list(decision.rules)
        out["statements"] = [
            _explained_json(r, e) for r, e in zip(requests, explanations, strict=True)
        ]
        print(json.dumps(out))
    else:
        _print_explanation(sys.stdout, decision.to_json(), requests, explanations, now)
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    state: SessionState = POSTGRES if args.dialect == "postgres" else MYSQL
    out = sys.stdout
    if not args.json:
        for text, st in split_and_inspect(sys.stdin.read(), state):
            out.write(json.dumps({"sql": text, **st.to_json()}) + "\n")
        return EXIT_OK
    bad = 0
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            sql = obj["sql"]
            if not isinstance(sql, str):
                raise TypeError("'sql' must be a string")
        except (ValueError, KeyError, TypeError) as exc:
            bad += 1
            print(f"stdin:{number}: expected a JSON object with key 'sql': {exc}", file=sys.stderr)
            continue
        results = split_and_inspect(sql, state)
        for text, st in results:
            record = {"sql": text, **st.to_json()}
            if "id" in obj:
                record["id"] = obj["id"]
            out.write(json.dumps(record) + "\n")
    return EXIT_INVALID if bad else EXIT_OK


def _when(at: str | None) -> float:
    if at is None:
        return time.time()
    text = at.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _http_request(text: str, host: str, headers: list[str]) -> HttpRequest:
    parts = text.split()
    if len(parts) != 2 or not parts[1].startswith("/"):
        raise ValueError(f'expected "METHOD /path", got {text!r}')
    pairs = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header expects NAME:VALUE, got {h!r}")
        pairs.append((name.strip().lower(), value.strip()))
    path = parts[1].split("?", 1)[0]
    return HttpRequest(parts[0].upper(), path, host, tuple(pairs))


def _explained_json(request: StatementInfo | HttpRequest, e: Explanation) -> dict[str, object]:
    head: dict[str, object]
    if isinstance(request, StatementInfo):
        head = {"statement": request.to_json()}
    else:
        head = {"http": {"method": request.method, "path": request.path, "host": request.host}}
    return {**head, "decision": e.decision.to_json(), "rules": [v.to_json() for v in e.verdicts]}


def _print_explanation(
    out: TextIO,
    decision: dict[str, object],
    requests: list[StatementInfo | HttpRequest],
    explanations: list[Explanation],
    now: float,
) -> None:
    enforced = "enforced" if decision["enforced"] else f"dry run; applied: {decision['applied']}"
    out.write(f"decision: {decision['action']} ({enforced})\n")
    out.write(f"  reason:  {decision['reason']}\n")
    if decision["message"]:
        out.write(f"  message: {decision['message']}\n")
    limits = decision["limits"]
    if isinstance(limits, list) and limits:
        for t in limits:
            out.write(f"  limit:   take a token from {t['key']} ({t['rate']} per {t['per']}s)\n")
    out.write(f"  at:      {datetime.fromtimestamp(now, UTC).isoformat()}\n")
    for request, e in zip(requests, explanations, strict=True):
        if isinstance(request, StatementInfo):
            what = (
                f"statement: {request.verb} verbs=[{', '.join(sorted(request.verbs))}] "
                f"tables=[{', '.join(request.tables)}]"
            )
            flags = [
                f for f, on in (("no-where", request.no_where), ("opaque", request.opaque)) if on
            ]
            if flags:
                what += " " + " ".join(flags)
            if request.error:
                what += f" error: {request.error}"
        else:
            what = f"request: {request.method} {request.path}"
        out.write(f"{what} -> {e.decision.action.value}\n")
        if not e.verdicts:
            out.write("  (no policy guards this destination)\n")
        for v in e.verdicts:
            mark = "+" if v.matched else "-"
            dry = " (dry run)" if not v.enforce else ""
            out.write(f"  {mark} {v.id} [{v.action}{dry}]: {v.why}\n")


if __name__ == "__main__":
    raise SystemExit(main())
