"""The policy language's validation: every error names file:line:col and what was expected."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from policies.errors import PolicyError
from policies.loader import load_paths, load_texts
from policies.spec import Action, OnExceed, Scope

HEAD = """\
apiVersion: sluice/v1
kind: Policy
metadata: {name: p}
spec:
  destination: orders-db
"""


def doc(body: str, head: str = HEAD) -> str:
    """A policy document whose spec continues with `body` (written at column 0)."""
    return head + textwrap.indent(textwrap.dedent(body), "  ")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_texts([("f.yaml", text)])
    return [str(p) for p in info.value.problems]


def test_full_example_loads_with_defaults() -> None:
    (policy,) = load_texts(
        [
            (
                "f.yaml",
                doc(
                    """\
                      timezone: Europe/London
                      rules:
                        - name: r1
                          sql: {verbs: [delete, Drop], tables: [orders]}
                          when: {time: "22:00-02:00", days: [fri]}
                          action: deny
                        - name: r2
                          from: [billing, "web-*"]
                          sql: {verbs: [INSERT]}
                          action: limit
                          limit: {rate: 200, per: 1s, burst: 50}
                          on_exceed: delay
                          max_delay: 250ms
                    """
                ),
            )
        ]
    )
    assert policy.name == "p" and policy.zone.key == "Europe/London"
    assert policy.default is Action.ALLOW
    r1, r2 = policy.rules
    assert r1.id == "p/r1" and r1.enforce and r1.line == 8
    assert r1.sql is not None and r1.sql.verbs == {"DELETE", "DROP"}
    assert r1.window is not None and r1.window.crosses_midnight and r1.window.days == {4}
    assert r1.sources.matches("anything")
    assert r2.sources.matches("web-7") and not r2.sources.matches("reporting")
    assert r2.limit is not None
    assert (r2.limit.rate, r2.limit.per, r2.limit.burst) == (200, 1.0, 50)
    assert r2.limit.scope is Scope.SOURCE_APP and r2.limit.on_exceed is OnExceed.DELAY
    assert r2.limit.max_delay == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        # A typo in a key must never silently disable a rule.
        (
            "rules:\n  - name: r\n    sql: {verb: [DELETE]}\n    action: deny\n",
            "8:13",
            "unknown key 'verb'",
        ),
        ("rules:\n  - name: r\n    action: deny\n    acton: allow\n", "9:7", "unknown key 'acton'"),
        (
            "rules:\n  - name: r\n    sql: {verbs: [DELET]}\n    action: deny\n",
            "8:21",
            "unknown SQL verb 'DELET'",
        ),
        (
            "rules:\n  - name: r\n    action: block\n",
            "8:15",
            "expected one of allow, deny, limit, audit",
        ),
        (
            "rules:\n  - {name: r, action: deny}\n  - {name: r, action: allow}\n",
            "8:7",
            "rule name 'r' is already used",
        ),
        ("timezone: Mars/Olympus\nrules: []\n", "6:13", "unknown IANA time zone 'Mars/Olympus'"),
        (
            "rules:\n  - name: r\n    when: {time: '25:00-26:00'}\n    action: deny\n",
            "8:20",
            "not a time of day",
        ),
        (
            "rules:\n  - name: r\n    when: {time: '10:00-10:00'}\n    action: deny\n",
            "8:20",
            "is empty",
        ),
        (
            "rules:\n  - name: r\n    when: {time: 1am-3am}\n    action: deny\n",
            "8:20",
            'expected "HH:MM-HH:MM"',
        ),
        (
            "rules:\n  - name: r\n    when: {time: '01:00-02:00', days: [mon, funday]}\n    action: deny\n",
            "8:47",
            "unknown day 'funday'",
        ),
        (
            "rules:\n  - name: r\n    action: limit\n    limit: {rate: 0}\n",
            "9:21",
            "limit.rate must be a positive number",
        ),
        ("rules:\n  - name: r\n    action: limit\n    limit: {rate: -5}\n", "9:21", "positive"),
        ("rules:\n  - name: r\n    action: limit\n", "7:7", "action limit needs a limit"),
        (
            "rules:\n  - name: r\n    action: limit\n    limit: {rate: 5, per: soon}\n",
            "9:29",
            "expected a duration",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    limit: {rate: 5}\n",
            "9:7",
            "only applies to action: limit",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    enforce: maybe\n",
            "9:16",
            "expected true or false",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    sql: {verbs: [DELETE]}\n    http: {methods: [GET]}\n",
            "10:7",
            "either sql or http",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    http: {methods: [FETCH]}\n",
            "9:24",
            "unknown HTTP method",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    http: {paths: [v1/x]}\n",
            "9:22",
            "must start with '/'",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    sql: {verbs: [SELECT], where: absent}\n",
            "9:30",
            "only applies to UPDATE and DELETE",
        ),
        (
            "rules:\n  - name: r\n    action: deny\n    from: []\n",
            "9:13",
            "must not be an empty list",
        ),
        ("rules:\n  - name: 'bad name!'\n    action: deny\n", "7:13", "is not a valid name"),
        ("default: maybe\nrules: []\n", "6:12", "expected one of allow, deny"),
        (
            "rules:\n  - name: r\n    action: deny\n    action: allow\n",
            "9:7",
            "duplicate key 'action'",
        ),
        ("rules: {name: r}\n", "6:10", "expected a list of rules"),
        ("rules:\n  - name: r\n    action: [deny\n", "9:1", "invalid YAML"),
    ],
)
def test_errors_name_file_line_column(body: str, where: str, says: str) -> None:
    found = problems(doc(body))
    assert any(p.startswith(f"f.yaml:{where}: ") and says in p for p in found), found


def test_header_errors() -> None:
    assert problems(
        "apiVersion: v2\nkind: Policy\nmetadata: {name: p}\nspec: {destination: x, rules: []}\n"
    ) == ["f.yaml:1:13: apiVersion: expected 'sluice/v1'"]
    found = problems(
        "apiVersion: sluice/v1\nkind: Polcy\nmetadata: {name: p}\nspec: {destination: x, rules: []}\n"
    )
    assert found == ["f.yaml:2:7: kind: expected one of Policy, got 'Polcy'"]
    found = problems("apiVersion: sluice/v1\nkind: Policy\nmetadata: {name: p}\n")
    assert found == ["f.yaml:1:1: policy: missing required key 'spec'"]


def test_all_problems_reported_and_nothing_accepted(tmp_path: Path) -> None:
    good = tmp_path / "a.yaml"
    good.write_text(doc("rules: [{name: ok, action: deny}]\n"))
    bad = tmp_path / "sub" / "b.yml"
    bad.parent.mkdir()
    bad.write_text(
        doc("rules: [{name: x, action: nope}]\n", HEAD.replace("name: p", "name: q"))
        + "---\n"
        + doc("rules: [{name: y, actoin: deny}]\n", HEAD.replace("name: p", "name: r"))
    )
    with pytest.raises(PolicyError) as info:
        load_paths([tmp_path])
    files = sorted({p.file for p in info.value.problems})
    assert files == [str(bad)]
    assert len(info.value.problems) == 2


def test_duplicate_policy_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(doc("rules: []\n"))
    (tmp_path / "b.yaml").write_text(doc("rules: []\n"))
    with pytest.raises(PolicyError) as info:
        load_paths([tmp_path])
    (problem,) = info.value.problems
    assert (
        problem.file.endswith("b.yaml") and "policy name 'p' is already used at" in problem.message
    )


def test_several_documents_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(
        doc("rules: []\n")
        + "---\n"
        + doc("rules: []\n", HEAD.replace("name: p", "name: p2"))
        + "---\n"  # an empty trailing document is fine
    )
    other = tmp_path / "other.yaml"
    other.write_text(doc("rules: []\n", HEAD.replace("name: p", "name: p3")))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    assert [p.name for p in load_paths([tmp_path])] == ["p", "p2", "p3"]
    # A file named directly and again through its directory is read once.
    assert [p.name for p in load_paths([other, tmp_path])] == ["p3", "p", "p2"]


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_paths([tmp_path / "nope.yaml", tmp_path])
    messages = [str(p) for p in info.value.problems]
    assert any("no such file or directory" in m for m in messages)
    assert any("holds no *.yaml" in m for m in messages)


def test_yaml_11_time_is_read_as_written() -> None:
    # Unquoted 01:00 is the integer 60 in YAML 1.1; the reader uses the source text.
    (policy,) = load_texts(
        [("f.yaml", doc("rules:\n  - name: r\n    when: {time: 01:00-03:00}\n    action: deny\n"))]
    )
    window = policy.rules[0].window
    assert window is not None and (window.start, window.end) == (60, 180)
