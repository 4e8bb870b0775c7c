"""The compiled builds (setup.py) for the tests that run a module's pure Python code and its
Cython build side by side."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from sidecar import builds


def compiled_build(source: ModuleType) -> ModuleType:
    """The Cython build of `source` (its `COMPILED_MODULE`), built from its current text.
    `make install` builds it; without it, or with a stale one, those cases fail (a silent
    fallback would test one build only), unless SLUICE_PURE_PYTHON is set, which skips
    them."""
    if os.environ.get(builds.PURE_ENV):
        pytest.skip(f"{builds.PURE_ENV} is set: pure Python only")
    name: str = source.COMPILED_MODULE
    module = builds.current(source.__file__ or "", name)
    if module is None:
        pytest.fail(f"{name} is not built from the current {source.__file__}: run `make install`")
    return module
