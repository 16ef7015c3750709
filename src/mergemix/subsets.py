"""Subsets of candidate datasets: naming, enumeration and sharding into chunks.

A subset of ``N`` candidates is a bitmask in ``1 .. 2**N - 1``; bit ``i`` selects ``names[i]``.
Pure Python, no I/O.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

SEP = "+"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def subset_id(names: Iterable[str]) -> str:
    """Canonical id of a set of dataset names: sorted and joined by ``+``."""
    names = sorted(set(names))
    if not names:
        raise ValueError("a subset must contain at least one dataset")
    return SEP.join(names)


def parse_subset(sid: str) -> list[str]:
    return sid.split(SEP)


def mask_to_names(mask: int, names: Sequence[str]) -> list[str]:
    return sorted(names[i] for i in range(len(names)) if mask >> i & 1)


def all_masks(n: int) -> range:
    """Every non-empty subset of ``n`` items, as bitmasks."""
    return range(1, 1 << n)


def chunk_range(n: int, k: int, num_chunks: int) -> range:
    """Bitmasks of chunk ``k`` (0-based) out of ``num_chunks``.

    The ``2**n - 1`` non-empty subsets are cut into ``num_chunks`` contiguous ranges whose sizes
    differ by at most one; chunks beyond the number of subsets are empty. Across all chunks every
    non-empty subset appears exactly once.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= k < num_chunks:
        raise ValueError(f"chunk index {k} outside 0..{num_chunks - 1}")
    total = (1 << n) - 1
    base, extra = divmod(total, num_chunks)
    start = k * base + min(k, extra)
    stop = start + base + (1 if k < extra else 0)
    return range(start + 1, stop + 1)


def all_subsets(names: Sequence[str]) -> list[list[str]]:
    return [mask_to_names(m, names) for m in all_masks(len(names))]


def sort_key(sid: str) -> tuple[int, str]:
    """Order subsets by size, then by name: the tie-break used for every selection."""
    return (sid.count(SEP) + 1, sid)
