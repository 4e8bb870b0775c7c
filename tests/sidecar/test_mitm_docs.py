"""The mitmproxy addon's section of docs/operations.md names exactly the options the addon
defines (read from its source: mitmproxy is not installed in this venv)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTION = "## HTTPS to external services, HTTP/2 and WebSocket: the mitmproxy addon"


def addon_options() -> set[str]:
    tree = ast.parse((REPO / "sidecar" / "mitm" / "addon.py").read_text(encoding="utf-8"))
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "add"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }


def test_operations_doc_names_every_addon_option_and_no_other() -> None:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"\bsluice_[a-z_]+", section))
    defined = addon_options()
    assert "sluice_app" in defined
    assert documented == defined
