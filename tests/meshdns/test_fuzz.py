"""Hypothesis: no byte string makes the answer layer raise, and every answer parses."""

from __future__ import annotations

import random

from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshdns.answer import Answerer, Forward
from meshdns.catalog import StaticCatalog
from meshdns.wire import read_question

from .conftest import CATALOG

_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _answerer(tmp: str, recursion: bool) -> Answerer:
    with open(tmp, "w") as f:
        f.write(CATALOG)
    return Answerer(StaticCatalog(tmp), recursion=recursion, rng=random.Random(1))


_A = {flag: _answerer(f"/tmp/meshdns-fuzz-{flag}.yaml", flag) for flag in (False, True)}
_VALID = [
    DNSRecord.question(n, t).pack()
    for n, t in [("web.service.consul", "A"), ("_web._v1.service.consul", "SRV"), ("x.org", "A")]
]


def _check(data: bytes, recursion: bool, tcp: bool) -> None:
    out = _A[recursion].handle(data, tcp=tcp)
    if isinstance(out, bytes):
        assert out[:2] == data[:2] and out[2] & 0x80
        try:
            DNSRecord.parse(data)
        except Exception:  # dnslib rejects some valid names (non-UTF-8 labels): skip the check
            return
        DNSRecord.parse(out)  # whatever we send for a query dnslib reads is well-formed
    else:
        assert out is None or (isinstance(out, Forward) and recursion)


@_SETTINGS
@given(st.binary(max_size=600), st.booleans(), st.booleans())
def test_random_bytes_never_raise(data: bytes, recursion: bool, tcp: bool) -> None:
    _check(data, recursion, tcp)
    read_question(data)


@_SETTINGS
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=6),
    st.integers(0, 80),
    st.booleans(),
)
def test_mutated_queries_never_raise(
    base: bytes, edits: list[tuple[int, int]], cut: int, recursion: bool
) -> None:
    data = bytearray(base)
    for at, value in edits:
        if at < len(data):
            data[at] = value
    _check(bytes(data[: len(data) - cut % (len(data) + 1)]), recursion, False)
