"""The last good policy set of a control-plane sidecar, kept on disk for fail-static starts.

`<state-dir>/policies/` holds one file per policy file of the set (named as the control
plane names them) and a `version` file. It is replaced atomically: each set is written to
its own directory `policies.<version>/`, fsynced, and `policies` is a symlink swapped with
one rename, so a crash at any point leaves either the old set or the new one, whole.
Only sets the sidecar could load are stored (`check_set` first): a set it cannot load is
never "last good".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from policies.engine import Engine
from policies.errors import PolicyError, Problem
from policies.loader import load_texts

log = logging.getLogger("sluice.policies")

VERSION_FILE = "version"
# Names from the control plane become paths here: plain components only, nothing hidden.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class PolicySet:
    version: int
    files: tuple[tuple[str, str], ...]  # (name, YAML text), sorted by name


def make_set(version: int, files: Mapping[str, str]) -> PolicySet:
    return PolicySet(version, tuple(sorted(files.items())))


def check_set(policy_set: PolicySet) -> Engine:
    """Validate a set as `sluice policy check` does, plus safe file names; raises
    PolicyError listing every problem."""
    bad = [
        Problem(name, 1, 1, "file name not usable on disk (plain path components only)")
        for name, _ in policy_set.files
        if not _safe_name(name)
    ]
    if bad:
        raise PolicyError(bad)
    return Engine(load_texts(policy_set.files))


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return name != VERSION_FILE and all(_COMPONENT.match(p) and p != ".." for p in parts)


class PolicyStore:
    """Reads and writes `<state-dir>/policies`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        self.link = self.root / "policies"

    def load(self) -> tuple[PolicySet, Engine] | None:
        """The stored set and its engine, or None when there is none (or it is unusable:
        logged, and the sidecar starts as if it had none)."""
        if not (self.link / VERSION_FILE).is_file():
            return None
        try:
            version = int((self.link / VERSION_FILE).read_text(encoding="ascii").strip())
            files = {
                str(p.relative_to(self.link)): p.read_text(encoding="utf-8")
                for p in sorted(self.link.rglob("*"))
                if p.is_file() and p.relative_to(self.link) != Path(VERSION_FILE)
            }
            policy_set = make_set(version, files)
            return policy_set, check_set(policy_set)
        except (OSError, ValueError, PolicyError) as exc:
            log.error("last good policy set in %s is unusable: %s", self.link, exc)
            return None

    def save(self, policy_set: PolicySet) -> None:
        """Store `policy_set` as the last good one, atomically; raises OSError."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"policies.{policy_set.version}"
        tmp = self.root / f".{name}.tmp"
        final = self.root / name
        for stale in (tmp, final):
            if stale.exists() and stale.resolve() != self.link.resolve():
                shutil.rmtree(stale)
        if final.exists():  # the same version is already in force on disk
            return
        tmp.mkdir()
        for file, text in policy_set.files:
            _write_synced(tmp / file, text)
        _write_synced(tmp / VERSION_FILE, f"{policy_set.version}\n")
        _sync(tmp)
        tmp.rename(final)
        new_link = self.root / ".policies.link.tmp"
        with contextlib.suppress(FileNotFoundError):
            new_link.unlink()
        new_link.symlink_to(name)
        if self.link.is_dir() and not self.link.is_symlink():
            # A directory someone made by hand: set aside once, so the swap can be atomic.
            self.link.rename(self.root / "policies.manual")
        os.replace(new_link, self.link)
        _sync(self.root)
        for old in self.root.glob("policies.*"):
            if old.name not in (name, "policies.manual") and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
