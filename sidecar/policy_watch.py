"""Keep a sidecar's policies current: reload on change, keep the last good set on a bad edit.

Polls the stat of every policy file (and the listing of every policy directory) at a fixed
interval; any change triggers a full reload through the same loader as `sluice policy
check`. A set that fails validation is logged with every problem and the previous engine
stays in force (fail static).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from policies.engine import Engine
from policies.errors import PolicyError
from policies.loader import load_paths, policy_files

log = logging.getLogger("sluice.policies")

_Stamp = tuple[tuple[str, int, int], ...]


class PolicyWatcher:
    """Owns the current `Engine` of a sidecar and its version counter."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self.version = 0
        self.last_error: str | None = None
        self._stamp: _Stamp = ()
        self.engine: Engine = self._load_initial()

    def _load_initial(self) -> Engine:
        # At start there is no last good set: an invalid set is an error for the caller.
        self._stamp = self._current_stamp()
        engine = Engine(load_paths(self.paths))
        self.version = 1
        return engine

    def poll(self) -> Engine | None:
        """Reload if anything changed; returns the new engine, or None when nothing changed
        or the new set was rejected (then `last_error` says why)."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            policies = load_paths(self.paths)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy reload rejected; still enforcing version %d:\n%s", self.version, exc)
            return None
        self.engine = Engine(policies)
        self.version += 1
        self.last_error = None
        rules = sum(len(p.rules) for p in policies)
        log.info(
            "policies reloaded: version %d, %d policies, %d rules",
            self.version,
            len(policies),
            rules,
        )
        return self.engine

    def _current_stamp(self) -> _Stamp:
        files, _problems = policy_files(self.paths)
        out = []
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((str(f), st.st_mtime_ns, st.st_size))
        for p in self.paths:  # a file appearing in, or vanishing from, a directory
            if Path(p).is_dir():
                out.append((p, -1, len(files)))
        return tuple(out)
