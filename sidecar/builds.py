"""Which build of a compiled module the sidecar runs: its Cython build when it is current.

Some hot modules (`sidecar/pg_session.py`, `sidecar/mysql_responses.py`,
`policies/sql/pg_fastshape.py`) stay one pure Python source, and Cython compiles the same
file into a second module at install (setup.py). A
build is used only when it is importable and was built from the source as it is now (setup.py
records each source's SHA-256 in the generated `sidecar/_built.py`), so an edited source is
never shadowed by a stale build (a stale build would enforce yesterday's rules); until
`make install` rebuilds it, the sidecar runs pure Python and logs a warning saying so.
Content, not file times: a wheel's files all get the time they were unpacked.
docs/decisions/0013-compiled-pg-session.md.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from policies.sql import pg_fastshape

log = logging.getLogger("sluice.sidecar")

PURE_ENV = "SLUICE_PURE_PYTHON"  # set (non-empty): always the pure Python classes


def current(source: str, compiled_module: str) -> ModuleType | None:
    """The compiled build `compiled_module` of the file `source` when it is wanted, built,
    and built from `source` as it is now; None: use the pure Python module."""
    if os.environ.get(PURE_ENV):
        return None
    try:
        module = importlib.import_module(compiled_module)
    except ImportError:  # not built (no Cython or no compiler at install): pure Python
        return None
    if built_from(compiled_module) != sha256(source):
        log.warning(
            "%s was built from another %s: using its pure Python code (run `make install` to "
            "rebuild it)",
            module.__file__,
            source,
        )
        return None
    return module


def built_from(compiled_module: str) -> str | None:
    """The SHA-256 of the source `compiled_module` was built from, as setup.py recorded it."""
    try:
        from sidecar import _built  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    recorded: dict[str, str] = getattr(_built, "SOURCE_SHA256", {})
    return recorded.get(compiled_module)


def sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def pg_fast_shape() -> Callable[[str], str | None] | None:
    """The compiled `fast_shape` of policies/sql/pg_fastshape.py when it is current, for the
    PostgreSQL routes' decision caches; None (libpg_query's normaliser alone) otherwise:
    run as pure Python its loop costs about what it saves (docs/decisions/0014)."""
    module = current(pg_fastshape.__file__, pg_fastshape.COMPILED_MODULE)
    if module is None:
        return None
    fast: Callable[[str], str | None] = module.fast_shape
    return fast
