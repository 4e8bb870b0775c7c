"""Shared test fixtures: where the repository and the shared SQL corpora live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# ../shared sits beside the clone in CI and on developer machines; a user's clone has none.
SHARED = Path(os.environ.get("SLUICE_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The labelled SQL corpora; skips the test with a clear message when they are absent."""
    if not (CORPUS / "pg_regress.jsonl").is_file():
        pytest.skip(f"SQL corpus not found at {CORPUS} (set SLUICE_SHARED to the shared/ folder)")
    return CORPUS
