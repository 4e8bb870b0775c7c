"""Build of the one compiled module: sidecar/pg_session.py through Cython.

The same source stays importable as pure Python (`sidecar.pg_session`); its compiled build
is `sidecar._pg_session_c`, which `sidecar.pg_session.session_class()` picks when it is not
older than the source (docs/decisions/0013-compiled-pg-session.md). Without Cython or a C
compiler the install goes on without it (`optional`): the sidecar then runs pure Python.
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # built without Cython (not the default: pyproject.toml requires it)
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("sidecar._pg_session_c", ["sidecar/pg_session.py"], optional=True)],
        language_level=3,
        build_dir="build/cython",
        quiet=True,
    )

setup(ext_modules=ext_modules)
