"""Which build of a session the sidecar runs (sidecar/builds.py): the Cython build of
sidecar/pg_session.py, and the MySQL session over the Cython build of
sidecar/mysql_responses.py, when they are current; the pure Python classes otherwise (never
stale code)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from policies.sql import pg_fastshape
from sidecar import builds, connection, mysql_responses, mysql_session, pg_session, server
from tests.compiled import compiled_build

ROOT = Path(__file__).resolve().parents[2]


def test_the_driver_runs_the_compiled_build() -> None:
    module = compiled_build(pg_session)
    assert connection.PG_SESSION is module.PgSession
    assert connection.PG_SESSION is not pg_session.PgSession
    assert connection.PG_SESSION.__module__ == pg_session.COMPILED_MODULE


def test_the_framing_state_is_an_extension_type_in_the_compiled_build() -> None:
    # The fields the framing loops read per message are C members of `_PgWire` (the reason
    # it exists); the deciding half, the driver and the tests still read and write them.
    module = compiled_build(pg_session)
    wire = module._PgWire
    assert not hasattr(wire, "__dict__") or "__dict__" not in vars(wire)
    for name in ("to_client", "to_server", "_pending", "_portals", "_statements", "wait"):
        assert type(vars(wire)[name]).__name__ == "getset_descriptor", name
    assert connection.PG_SESSION.client_pass is wire.client_pass
    assert connection.PG_SESSION.server_pass is wire.server_pass


def test_the_pure_modules_run_without_cython(tmp_path: Path) -> None:
    # Cython is a build dependency: without it, the compiled sources still import and run as
    # pure Python (their stand-in decorators), and the driver takes the pure classes.
    script = tmp_path / "no_cython.py"
    script.write_text(
        textwrap.dedent(
            """\
            import struct, sys
            sys.modules["cython"] = None  # import cython: ModuleNotFoundError
            from policies.sql import pg_fastshape
            from sidecar import connection, mysql_responses, pg_session
            assert not pg_session._COMPILED and not mysql_responses._COMPILED
            assert pg_fastshape.fast_shape("SELECT 1") == "\\0SELECT $i"
            assert connection.PG_SESSION is pg_session.PgSession
            print("ok")
            """
        )
    )
    env = {**os.environ, "SLUICE_PURE_PYTHON": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_driver_runs_the_mysql_session_over_the_compiled_responses() -> None:
    module = compiled_build(mysql_responses)
    cls = connection.MYSQL_SESSION
    assert cls is mysql_session.over_responses(module.Responses)
    assert issubclass(cls, mysql_session.MySqlSession) and cls is not mysql_session.MySqlSession
    assert cls.__module__ == mysql_responses.COMPILED_MODULE
    # The response FIFO's methods are the compiled ones; the session's and the handshake's
    # (hooks included) are not replaced.
    assert cls.responses is module.Responses.responses
    assert cls._packet is module.Responses._packet
    for hook in ("record", "server_status", "auth_more", "auth_done", "remember_prepared"):
        assert getattr(cls, hook) is getattr(mysql_session.MySqlSession, hook)
    assert "_fail" not in vars(cls) and "__init__" not in vars(cls)
    # The entry the session's fast path queues is the one the compiled loop looks for.
    assert module.PLAIN_RESULT is mysql_responses.PLAIN_RESULT


def _stale_then_current(
    module: ModuleType,
    source: ModuleType,
    choose: Callable[[], type],
    compiled: type,
    pure: type,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = Path(source.__file__ or "")
    edited = tmp_path / original.name  # the source, edited after the build
    edited.write_bytes(original.read_bytes() + b"# edited\n")
    monkeypatch.setattr(source, "__file__", str(edited))
    with caplog.at_level(logging.WARNING, logger="sluice.sidecar"):
        assert choose() is pure
    assert "make install" in caplog.text and "pure Python" in caplog.text
    # The same text again (a checkout, a wheel unpacked later: any file time): current.
    edited.write_bytes(original.read_bytes())
    os.utime(edited, (time.time() + 3600, time.time() + 3600))
    assert choose() is compiled


def test_a_build_from_another_source_text_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = compiled_build(pg_session)
    _stale_then_current(
        module,
        pg_session,
        pg_session.session_class,
        module.PgSession,
        pg_session.PgSession,
        tmp_path,
        monkeypatch,
        caplog,
    )


def test_a_mysql_responses_build_from_another_source_text_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = compiled_build(mysql_responses)
    _stale_then_current(
        module,
        mysql_responses,
        mysql_session.session_class,
        mysql_session.over_responses(module.Responses),
        mysql_session.MySqlSession,
        tmp_path,
        monkeypatch,
        caplog,
    )


def test_a_missing_build_means_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mysql_responses, "COMPILED_MODULE", "sidecar._not_built_c")
    assert mysql_session.session_class() is mysql_session.MySqlSession
    assert builds.current(mysql_responses.__file__, "sidecar._not_built_c") is None


def test_the_environment_can_ask_for_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(builds.PURE_ENV, "1")
    assert pg_session.session_class() is pg_session.PgSession
    assert mysql_session.session_class() is mysql_session.MySqlSession


def test_the_ready_line_names_the_builds_in_use() -> None:
    compiled_build(pg_session)
    compiled_build(mysql_responses)
    compiled_build(pg_fastshape)
    assert server.builds_in_use() == (
        "PostgreSQL session compiled, MySQL responses compiled, PostgreSQL fast shapes compiled"
    )
