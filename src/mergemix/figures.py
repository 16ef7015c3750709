"""Figure 1 style scatter plots: merged vs mixture, and each similarity metric vs mixture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mergemix import io, metrics
from mergemix.similarity import METRICS


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig, out_base: Path, formats) -> None:
    import matplotlib.pyplot as plt

    for fmt in formats:
        path = out_base.with_suffix("." + fmt)
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)


def plot_all(data, corr_df, out_dir, eps, formats, sampled: bool = False) -> None:
    scope = " (sampled mixtures)" if sampled else ""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corr = corr_df.set_index("target")
    targets = list(data)
    # merged vs mixture
    fig, axes = _grid(len(targets))
    for ax, t in zip(axes, targets):
        merged, mix, _, base = data[t]
        ax.set_title(f"{t}  r={corr.loc[t, 'pearson_logit']:.2f}", fontsize=9)
        ax.set_xlabel("merged: Δ logit acc", fontsize=8)
        ax.set_ylabel("mixture: Δ logit acc", fontsize=8)
        if mix is None:
            continue
        j = merged.merge(mix, on=["subset", "size"], suffixes=("_m", "_f"))
        x = metrics.logit(j["test_acc_m"], eps) - metrics.logit(base, eps)
        y = metrics.logit(j["test_acc_f"], eps) - metrics.logit(base, eps)
        single = (j["size"] == 1).to_numpy()
        ax.scatter(x[~single], y[~single], s=10, alpha=0.7, label="mixtures")
        ax.scatter(x[single], y[single], marker="x", s=30, color="k", label="single datasets")
        lo, hi = float(np.min([x.min(), y.min()])), float(np.max([x.max(), y.max()]))
        ax.plot([lo, hi], [lo, hi], lw=0.6, color="grey")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Merged vs mixture-fine-tuned{scope} (average r = {corr.loc['average', 'pearson_logit']:.2f})")
    fig.tight_layout()
    _save(fig, out_dir / "merged_vs_mixture", formats)
    # similarity metrics vs mixture
    for m in METRICS:
        fig, axes = _grid(len(targets))
        for ax, t in zip(axes, targets):
            _, mix, sim, base = data[t]
            ax.set_title(f"{t}  r={corr.loc[t, f'{m}_pearson_logit']:.2f}", fontsize=9)
            ax.set_xlabel(m, fontsize=8)
            ax.set_ylabel("mixture: Δ logit acc", fontsize=8)
            if mix is None:
                continue
            j = sim.merge(mix, on=["subset", "size"])
            ax.scatter(j[m], metrics.logit(j["test_acc"], eps) - metrics.logit(base, eps), s=10, alpha=0.7)
        fig.suptitle(f"{m} vs mixture-fine-tuned{scope} (average r = {corr.loc['average', f'{m}_pearson_logit']:.2f})")
        fig.tight_layout()
        _save(fig, out_dir / f"similarity_{m}", formats)
