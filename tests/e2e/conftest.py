"""Fixtures for the end-to-end tests: the scratch database on the real PostgreSQL."""

from __future__ import annotations

from tests.sidecar.conftest import scratch_db

__all__ = ["scratch_db"]
