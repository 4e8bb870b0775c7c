"""Which build of a compiled module the sidecar runs: its Cython build when it is current.

Some hot modules (`sidecar/pg_session.py`, `sidecar/mysql_responses.py`) stay one pure Python
source, and Cython compiles the same file into a second module at install (setup.py). A
build is used only when it is importable and its file is not older than the source, so an
edited source is never shadowed by a stale build (a stale build would enforce yesterday's
rules); until `make install` rebuilds it, the sidecar runs pure Python and logs a warning
saying so. docs/decisions/0013-compiled-pg-session.md.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger("sluice.sidecar")

PURE_ENV = "SLUICE_PURE_PYTHON"  # set (non-empty): always the pure Python classes


def current(source: str, compiled_module: str) -> ModuleType | None:
    """The compiled build `compiled_module` of the file `source` when it is wanted, built
    and not older than `source`; None: use the pure Python module."""
    if os.environ.get(PURE_ENV):
        return None
    try:
        module = importlib.import_module(compiled_module)
    except ImportError:  # not built (no Cython or no compiler at install): pure Python
        return None
    built = module.__file__
    if built is None or os.path.getmtime(built) < os.path.getmtime(source):
        log.warning(
            "%s is older than %s: using the pure Python session (run `make install` to rebuild it)",
            built,
            source,
        )
        return None
    return module
