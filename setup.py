"""Build of the compiled modules: sidecar/pg_session.py and sidecar/mysql_responses.py
through Cython.

Each source stays importable as pure Python (`sidecar.pg_session`, `sidecar.mysql_responses`);
its compiled build (`sidecar._pg_session_c`, `sidecar._mysql_responses_c`) is used when it is
not older than the source (`sidecar.builds.current`; docs/decisions/0013-compiled-pg-session.md).
Without Cython or a C compiler the install goes on without them (`optional`): the sidecar then
runs pure Python. Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

COMPILED = {
    "sidecar._pg_session_c": "sidecar/pg_session.py",
    "sidecar._mysql_responses_c": "sidecar/mysql_responses.py",
}

try:
    from Cython.Build import cythonize
except ImportError:  # built without Cython (not the default: pyproject.toml requires it)
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension(name, [source], optional=True) for name, source in COMPILED.items()],
        language_level=3,
        build_dir="build/cython",
        quiet=True,
    )

setup(ext_modules=ext_modules)
