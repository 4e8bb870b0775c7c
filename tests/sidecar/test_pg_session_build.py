"""Which build of the PostgreSQL session the sidecar runs: the Cython build of
sidecar/pg_session.py when it is current, the pure Python class otherwise (never stale code)."""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path

import pytest

from sidecar import pg_session, server


def compiled_module() -> object:
    if os.environ.get(pg_session.PURE_ENV):
        pytest.skip(f"{pg_session.PURE_ENV} is set: the pure Python session only")
    try:
        return importlib.import_module(pg_session.COMPILED_MODULE)
    except ImportError as exc:
        pytest.fail(f"the compiled session is not built ({exc}): run `make install`")


def test_the_driver_runs_the_compiled_build() -> None:
    module = compiled_module()
    assert server._PG_SESSION is module.PgSession  # type: ignore[attr-defined]
    assert server._PG_SESSION is not pg_session.PgSession
    assert server._PG_SESSION.__module__ == pg_session.COMPILED_MODULE


def test_a_build_older_than_its_source_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = compiled_module()
    built = Path(module.__file__)  # type: ignore[attr-defined]
    edited = tmp_path / "pg_session.py"  # stands for the source, edited after the build
    edited.write_text("# edited\n")
    later = built.stat().st_mtime + 60
    os.utime(edited, (later, later))
    monkeypatch.setattr(pg_session, "__file__", str(edited))
    with caplog.at_level(logging.WARNING, logger="sluice.sidecar"):
        assert pg_session.session_class() is pg_session.PgSession
    assert "make install" in caplog.text and "pure Python" in caplog.text
    # The same build, current again: used.
    os.utime(edited, (time.time() - 3600, built.stat().st_mtime - 1))
    assert pg_session.session_class() is module.PgSession  # type: ignore[attr-defined]


def test_the_environment_can_ask_for_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pg_session.PURE_ENV, "1")
    assert pg_session.session_class() is pg_session.PgSession
