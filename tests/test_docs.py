"""Every example in docs/policies.md runs: YAML blocks load, console blocks give their output.

A YAML block starting `# file: NAME` is written to NAME in a scratch directory; it must load
(or, with `# expect-error: TEXT`, fail with TEXT). A `console` block is a script: each
`$ COMMAND` runs there (stdout and stderr together), and the lines until the next `$` are
its expected output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from policies.errors import PolicyError
from policies.loader import load_paths

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "docs" / "policies.md"]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\s*$", re.S | re.M)


def blocks(doc: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(doc.read_text(encoding="utf-8"))]


def materialise(doc: Path, where: Path) -> list[tuple[Path, str | None]]:
    files = []
    for lang, body in blocks(doc):
        if lang != "yaml":
            continue
        first = body.splitlines()[0]
        assert first.startswith("# file: "), f"{doc.name}: a yaml block needs '# file: NAME'"
        path = where / first.removeprefix("# file: ").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
        m = re.search(r"^# expect-error: (.*)$", body, re.M)
        files.append((path, m.group(1) if m else None))
    return files


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_yaml_examples_load(doc: Path, tmp_path: Path) -> None:
    files = materialise(doc, tmp_path)
    assert files
    for path, error in files:
        if error is None:
            assert load_paths([path])
        else:
            with pytest.raises(PolicyError, match=re.escape(error)):
                load_paths([path])


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_console_examples_run(doc: Path, tmp_path: Path) -> None:
    materialise(doc, tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ran = 0
    for lang, body in blocks(doc):
        if lang != "console":
            continue
        for command, expected in _script(body):
            r = subprocess.run(
                command,
                shell=True,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            got = (r.stdout + r.stderr).rstrip("\n")
            assert got == expected, f"$ {command}\n--- expected\n{expected}\n--- got\n{got}"
            ran += 1
    assert ran


def _script(body: str) -> list[tuple[str, str]]:
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return [(cmd, "\n".join(out).rstrip("\n")) for cmd, out in steps]
