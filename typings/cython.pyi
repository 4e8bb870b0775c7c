# The names sidecar/pg_session.py, sidecar/mysql_responses.py and policies/sql/pg_fastshape.py
# take from Cython's pure-Python mode, for mypy: C types are plain Python types to the type
# checker (Cython itself is a build-time dependency, setup.py).
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

compiled: bool
Py_ssize_t: TypeAlias = int
bint: TypeAlias = bool
Py_UCS4: TypeAlias = str  # one character
double: TypeAlias = float

def cfunc(function: _F) -> _F: ...

_C = TypeVar("_C", bound=type)

def cclass(cls: _C) -> _C: ...
def declare(t: Any = ..., value: Any = ..., visibility: str = ...) -> Any: ...
