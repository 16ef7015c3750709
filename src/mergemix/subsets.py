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
    """Bitmasks (or Gray-code indices, see :func:`gray_chunk`) of chunk ``k`` (0-based) out of ``num_chunks``.

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


def gray(i: int) -> int:
    """The ``i``-th binary reflected Gray code: ``gray(i)`` and ``gray(i + 1)`` differ in one bit."""
    return i ^ (i >> 1)


def gray_chunk(n: int, k: int, num_chunks: int) -> list[tuple[int, int]]:
    """Chunk ``k`` of the exhaustive enumeration in Gray-code order: ``(order, mask)`` pairs.

    The exhaustive enumeration visits ``gray(1), gray(2), ..., gray(2**n - 1)``: every non-empty
    subset exactly once (``gray`` is a bijection of ``0 .. 2**n - 1`` fixing 0), each differing from
    the one before in one candidate, so a running sum of the selected models changes by one add or
    subtract per step. Chunks are the contiguous index ranges of :func:`chunk_range` over that
    sequence; ``order`` is the position in it (0-based), the evaluation order of the exhaustive search.
    """
    return [(i - 1, gray(i)) for i in chunk_range(n, k, num_chunks)]


def all_subsets(names: Sequence[str]) -> list[list[str]]:
    return [mask_to_names(m, names) for m in all_masks(len(names))]


def sort_key(sid: str) -> tuple[int, str]:
    """Order subsets by size, then by name: the tie-break used for every selection."""
    return (sid.count(SEP) + 1, sid)


def popcount(mask: int) -> int:
    return bin(mask).count("1")


def names_to_mask(names: Iterable[str], candidates: Sequence[str]) -> int:
    index = {n: i for i, n in enumerate(candidates)}
    mask = 0
    for n in names:
        if n not in index:
            raise ValueError(f"{n!r} is not among the candidates {list(candidates)}")
        mask |= 1 << index[n]
    return mask


def sample_mixtures(
    names: Sequence[str], size: int, seed: int, min_size: int = 2, max_size: int | None = None
) -> list[list[str]]:
    """A fixed, size-stratified sample of ``size`` subsets of ``names`` with ``min_size`` to
    ``max_size`` (default: all) members.

    The sample is spread as evenly as possible over the subset sizes ``min_size .. max_size``
    (a size with fewer subsets than its share gives them all and passes the rest on), and drawn
    uniformly without replacement within each size, seeded. Subsets are returned as sorted name
    lists, ordered by size then name, so the same config always plans the same jobs.
    """
    import math

    import numpy as np

    names = sorted(names)
    m = len(names)
    sizes = list(range(min_size, min(m, max_size or m) + 1))
    if size < 1:
        raise ValueError(f"mixture sample size must be >= 1, got {size}")
    if not sizes:
        return []
    avail = {k: math.comb(m, k) for k in sizes}
    quota = {k: 0 for k in sizes}
    left = min(size, sum(avail.values()))
    open_sizes = list(sizes)
    while left > 0:  # water-filling: equal shares, capped by what each size has
        share, extra = divmod(left, len(open_sizes))
        for i, k in enumerate(open_sizes):
            quota[k] += min(share + (1 if i < extra else 0), avail[k] - quota[k])
        left = min(size, sum(avail.values())) - sum(quota.values())
        open_sizes = [k for k in open_sizes if quota[k] < avail[k]]
    rng = np.random.default_rng(seed)
    out: list[list[str]] = []
    for k in sizes:
        if quota[k] == avail[k]:
            from itertools import combinations

            picked = [list(c) for c in combinations(range(m), k)]
        else:
            seen: set[tuple[int, ...]] = set()
            picked = []
            while len(picked) < quota[k]:  # rejection sampling: quota < C(m, k), so this ends
                c = tuple(sorted(rng.choice(m, size=k, replace=False).tolist()))
                if c not in seen:
                    seen.add(c)
                    picked.append(list(c))
        out += [[names[i] for i in c] for c in picked]
    return sorted(out, key=lambda s: (len(s), s))
