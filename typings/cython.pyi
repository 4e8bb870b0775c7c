# The names sidecar/pg_session.py and sidecar/mysql_responses.py take from Cython's pure-Python
# mode, for mypy: C types are plain Python types to the type checker (Cython itself is a
# build-time dependency, setup.py).
from typing import TypeAlias

compiled: bool
Py_ssize_t: TypeAlias = int
bint: TypeAlias = bool
