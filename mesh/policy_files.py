"""Read policy files and directories into a policy set: {file name: YAML text}.

Names are what the control plane stores and every sidecar writes to disk: a file given by
path is named by its base name, a file found in a directory by its path relative to that
directory. Two files that would get one name are an error, not a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from policies.errors import PolicyError, Problem
from policies.loader import policy_files


def read_policy_set(paths: Sequence[str | Path]) -> dict[str, str]:
    """The files under `paths` by name; PolicyError if a path is missing or unreadable."""
    files, problems = policy_files(paths)
    roots = [Path(p) for p in paths if Path(p).is_dir()]
    out: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for file in files:
        name = _name(file, roots)
        if name in out:
            problems.append(Problem(str(file), 1, 1, f"same name {name!r} as {origin[name]}"))
            continue
        try:
            out[name] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(file), 1, 1, f"cannot read: {exc}"))
            continue
        origin[name] = file
    if problems:
        raise PolicyError(problems)
    return out


def _name(file: Path, roots: list[Path]) -> str:
    for root in roots:
        if file.is_relative_to(root):
            return file.relative_to(root).as_posix()
    return file.name
