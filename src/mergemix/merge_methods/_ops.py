"""The shared steps of the task-vector merge methods, over flat vectors (pure tensor math).

``deltas`` is ``[k, P]``: one task vector ``theta_i - theta0`` per row. A *scope* is where a
per-vector statistic is taken (the top-k magnitudes of TIES, the L1 norm of DARE's ``l1``
rescale): the whole task vector (``segments=None``, as in the TIES and DARE papers) or each
parameter tensor (``segments``: the tensors' sizes, in the order of the flat vector, as mergekit
does per tensor). The steps follow mergekit's ``GeneralizedTaskArithmeticMerge`` (0.1.5) so that
on one tensor they give its numbers: the same count of kept entries, the same sign election
(an exact tie elects +), the same divisor.
"""

from __future__ import annotations

from typing import Sequence

from mergemix.lazy import LazyModule

torch = LazyModule("torch")  # imported on first use, not when the workflow reads the config (mergemix.lazy)

L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below this


def task_vectors(thetas: torch.Tensor, theta0: torch.Tensor | None, method: str) -> torch.Tensor:
    """``thetas - theta0`` (a new tensor), after checking that ``theta0`` fits."""
    if theta0 is None:
        raise ValueError(
            f"merge method {method!r} needs the pre-trained state theta0 (task vectors are theta_i - theta0)"
        )
    if theta0.shape != thetas.shape[1:]:
        raise ValueError(f"theta0 has shape {tuple(theta0.shape)}, thetas rows have {tuple(thetas.shape[1:])}")
    return thetas - theta0


def model_weights(weights: Sequence[float] | None, thetas: torch.Tensor) -> torch.Tensor:
    """The per-model weights as a ``[k]`` tensor (ones when None), in the dtype and device of thetas."""
    k = thetas.shape[0]
    if weights is None:
        return torch.ones(k, dtype=thetas.dtype, device=thetas.device)
    w = torch.as_tensor(weights, dtype=thetas.dtype).to(thetas.device)
    if w.shape != (k,):
        raise ValueError(f"weights has {w.numel()} values for {k} merged models; give one weight per model")
    return w


def spans(n: int, segments: Sequence[int] | None) -> list[tuple[int, int]]:
    """``(start, end)`` of each scope in a flat vector of ``n`` values."""
    if segments is None:
        return [(0, n)]
    sizes = [int(s) for s in segments]
    if any(s <= 0 for s in sizes) or sum(sizes) != n:
        raise ValueError(
            f"segments must be positive tensor sizes adding up to {n}, got {len(sizes)} adding up to {sum(sizes)}"
        )
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def scope_segments(scope: str, segments: Sequence[int] | None, method: str) -> Sequence[int] | None:
    """The segments a scope uses: None for global; the engine's tensor sizes for tensor."""
    if scope == "global":
        return None
    if segments is None:
        raise ValueError(
            f"merge method {method!r} with scope: tensor needs the tensor sizes (segments) from the merge "
            "engine, which gave none; use scope: global"
        )
    return segments


def trim_magnitude(deltas: torch.Tensor, density: float, segments: Sequence[int] | None = None) -> torch.Tensor:
    """Keep, per row and scope, the ``max(1, int(density * n))`` entries of largest magnitude; zero the rest."""
    if density >= 1:
        return deltas
    out = torch.zeros_like(deltas)
    for a, b in spans(deltas.shape[1], segments):
        seg = deltas[:, a:b]
        idx = seg.abs().topk(max(1, int(density * (b - a))), dim=1, sorted=False).indices
        out[:, a:b].scatter_(1, idx, seg.gather(1, idx))
    return out


def row_seed(seed: int, row: int) -> int:
    """The generator seed of model ``row`` (its index among all candidates) for option ``seed``.

    32 bits, as torch's CPU generator (mt19937) uses only the low 32 bits of a seed:
    ``seed + row * 0x9E3779B9 (mod 2**32)``, an odd multiplier, so that within one seed every row
    has its own generator and for one row every seed does.
    """
    return (int(seed) + int(row) * 0x9E3779B9) % 2**32


def drop_random(
    deltas: torch.Tensor,
    density: float,
    seed: int,
    rows: Sequence[int] | None = None,
    rescale: str = "inverse",
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (drop with p = 1 - density) and rescale.

    Row i's mask is ``torch.bernoulli`` of a ``density``-filled vector, drawn with a generator on
    the deltas' device seeded with ``row_seed(seed, rows[i])``: a model keeps the same mask in
    every subset that contains it when the engine passes ``rows`` (the models' indices among all
    candidates; default ``0..k-1``). The same seed, rows and device give bit-identical output (CPU
    and CUDA generators draw different streams). ``rescale``: ``inverse`` divides the kept entries
    by ``density`` (= 1/(1-p), the paper), ``l1`` restores each scope's L1 norm (mergekit), ``none``.
    """
    if density >= 1:
        return deltas
    k = deltas.shape[0]
    rows = list(range(k)) if rows is None else [int(r) for r in rows]
    if len(rows) != k or len(set(rows)) != k or any(not 0 <= r < 2**32 for r in rows):
        raise ValueError(f"rows must be {k} distinct model indices in [0, 2**32), got {rows}")
    parts = spans(deltas.shape[1], segments)
    out = torch.empty_like(deltas)
    gen = torch.Generator(device=deltas.device)
    for i, row in enumerate(rows):
        gen.manual_seed(row_seed(seed, row))
        kept = deltas[i] * torch.bernoulli(torch.full_like(deltas[i], density), generator=gen)
        if rescale == "inverse":
            kept /= density
        elif rescale == "l1":
            for a, b in parts:
                before, after = deltas[i, a:b].abs().sum(), kept[a:b].abs().sum()
                small = (before < L1_EPS) | (after < L1_EPS)
                kept[a:b] *= torch.where(small, torch.ones_like(before), before / after)
        elif rescale != "none":
            raise ValueError(f"rescale must be one of inverse, l1, none, got {rescale!r}")
        out[i] = kept
    return out


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election by mass: the sign of the summed deltas per entry (+1 on an exact tie)."""
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def combine(
    deltas: torch.Tensor, weights: torch.Tensor, *, consensus: bool, normalize: bool, lambda_: float
) -> torch.Tensor:
    """The merged task vector ``lambda * sum_i w_i delta_i [/ divisor]`` (mergekit's merge_group).

    With ``consensus`` (TIES), only the entries whose sign agrees with the elected sign of the
    weighted deltas count (zeros never agree), and ``normalize`` divides by the summed weights of
    the agreeing models per entry (the disjoint mean); without, by the sum of all weights.
    ``deltas`` is overwritten.
    """
    if consensus:
        deltas.mul_(weights[:, None])
        agree = deltas.sign() == elect_sign(deltas)
        mixed = deltas.mul_(agree).sum(dim=0)
        if normalize:
            divisor = (weights[:, None] * agree).sum(dim=0)
            mixed /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weights @ deltas
        if normalize:
            total = weights.sum()
            mixed /= torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed
