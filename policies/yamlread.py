"""Typed reading of YAML nodes with positions, so every validation error names file:line:col.

PyYAML's composer keeps a mark on every node. Reading the node tree (rather than the Python
objects `safe_load` builds) lets us reject duplicate keys, report the exact place of a bad
value, and read scalars by their source text, which sidesteps YAML 1.1 surprises such as
`01:00` becoming the integer 60.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml

from policies.errors import Problem

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_NULL = "tag:yaml.org,2002:null"


class Invalid(Exception):
    """Raised inside a reader for an error that makes the rest of a node unreadable."""

    def __init__(self, node: yaml.Node | None, message: str) -> None:
        super().__init__(message)
        self.node = node
        self.message = message


@dataclass
class Reader:
    """Collects problems for one source file while values are read from its nodes."""

    file: str
    problems: list[Problem] = field(default_factory=list)

    def problem(self, node: yaml.Node | None, message: str) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.problems.append(Problem(self.file, line, col, message))

    def documents(self, text: str) -> Iterator[yaml.Node]:
        """Every non-empty document of a YAML stream; a syntax error becomes a problem."""
        try:
            for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
                if node is None or (node.tag == _NULL and not str(node.value).strip()):
                    continue  # an empty document, e.g. after a trailing `---`
                yield node
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            what = " ".join(p for p in (exc.context, exc.problem) if p)
            self.problems.append(Problem(self.file, line, col, f"invalid YAML: {what}"))
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self.file, 1, 1, f"invalid YAML: {exc}"))


def mapping(
    node: yaml.Node, what: str, allowed: frozenset[str], required: frozenset[str] = frozenset()
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node as {key: (key_node, value_node)}; unknown and duplicate keys are errors."""
    if not isinstance(node, yaml.MappingNode):
        raise Invalid(node, f"{what}: expected a mapping, got {_kind(node)}")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise Invalid(key_node, f"{what}: keys must be plain strings")
        key = str(key_node.value)
        if key in out:
            raise Invalid(key_node, f"{what}: duplicate key {key!r}")
        if key not in allowed:
            raise Invalid(
                key_node,
                f"{what}: unknown key {key!r}; expected one of {', '.join(sorted(allowed))}",
            )
        out[key] = (key_node, value_node)
    missing = sorted(required - out.keys())
    if missing:
        raise Invalid(node, f"{what}: missing required key {missing[0]!r}")
    return out


def string(node: yaml.Node, what: str) -> str:
    """A non-empty scalar read by its source text (numbers and dates stay as written)."""
    if not isinstance(node, yaml.ScalarNode) or (node.tag in (_NULL, _BOOL) and not node.style):
        raise Invalid(node, f"{what}: expected a string, got {_kind(node)}")
    value = str(node.value)
    if not value.strip():
        raise Invalid(node, f"{what}: must not be empty")
    return value


def strings(node: yaml.Node, what: str) -> list[tuple[yaml.Node, str]]:
    """A list of strings; a single string is accepted as a list of one."""
    if isinstance(node, yaml.ScalarNode):
        return [(node, string(node, what))]
    if not isinstance(node, yaml.SequenceNode):
        raise Invalid(node, f"{what}: expected a list of strings, got {_kind(node)}")
    if not node.value:
        raise Invalid(node, f"{what}: must not be an empty list")
    return [(item, string(item, what)) for item in node.value]


def boolean(node: yaml.Node, what: str) -> bool:
    if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL:
        raise Invalid(node, f"{what}: expected true or false, got {_kind(node)}")
    return str(node.value).lower() in ("true", "yes", "on", "y")


def number(node: yaml.Node, what: str) -> float:
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (_INT, _FLOAT):
        raise Invalid(node, f"{what}: expected a number, got {_kind(node)}")
    try:
        return float(str(node.value).replace("_", ""))
    except ValueError:
        raise Invalid(node, f"{what}: expected a number, got {node.value!r}") from None


def choice(node: yaml.Node, what: str, options: tuple[str, ...]) -> str:
    value = string(node, what)
    if value not in options:
        raise Invalid(node, f"{what}: expected one of {', '.join(options)}, got {value!r}")
    return value


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing (null)"
    return repr(str(node.value))
