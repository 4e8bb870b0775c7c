"""Cutting a captured stream the way reads may cut it, for the replay tests: whole, one byte
per read, or in random pieces. A session's output must not depend on the cut."""

from __future__ import annotations

import random

HOWS = ("whole", "bytewise", "random")


def pieces(data: bytes, how: str, rng: random.Random, most: int) -> list[bytes]:
    """`data` as reads of it: one (whole), one per byte (bytewise), or random pieces of 1 to
    `most` bytes drawn from `rng` (random)."""
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, most)
        out.append(data[pos : pos + n])
        pos += n
    return out
