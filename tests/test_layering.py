"""The architecture's import rules: `policies` is pure and depends on nothing of ours;
protocol codecs are sans-I/O; dependencies point one way (see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IO_MODULES = {
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "http",
    "urllib",
    "uvloop",
    "aiohttp",
    "requests",
}
RULES = {
    # package: forbidden top-level imports
    "policies": IO_MODULES | {"sidecar", "mesh", "meshdns"},
    "sidecar/protocols": IO_MODULES | {"mesh", "meshdns"},
    "sidecar": {"mesh", "meshdns"},
    "meshdns": {"sidecar", "mesh"},
    # The control plane's stores are synchronous and pure: the API calls them from threads.
    "mesh/store": IO_MODULES | {"sidecar", "meshdns", "fastapi", "starlette", "uvicorn", "anyio"},
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_rules(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    bad = {
        str(f.relative_to(REPO)): sorted(imports(f) & RULES[package])
        for f in files
        if imports(f) & RULES[package]
    }
    assert not bad, f"forbidden imports: {bad}"


def test_every_module_says_its_role() -> None:
    missing = []
    for package in ("policies", "sidecar", "mesh", "meshdns"):
        for f in sorted((REPO / package).rglob("*.py")):
            if not ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))):
                missing.append(str(f.relative_to(REPO)))
    assert not missing, f"modules without a docstring: {missing}"
