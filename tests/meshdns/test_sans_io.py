"""The answer layer is sans-I/O: wire.py, answer.py and catalog.py import no sockets or asyncio."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_layering import IO_MODULES, imports

MESHDNS = Path(__file__).resolve().parents[2] / "meshdns"


@pytest.mark.parametrize("module", ["wire.py", "answer.py", "catalog.py"])
def test_no_io_imports(module: str) -> None:
    assert not imports(MESHDNS / module) & IO_MODULES
