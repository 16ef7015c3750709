"""Figure 1 style scatter plots (merged vs mixture, and each similarity metric vs mixture) and the
report's overview of the method's result per target. Axes, titles and legends are in words."""

from __future__ import annotations

import io as _io
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
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows + 0.6), squeeze=False)
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


MERGED_GAIN = "merged model: gain over\npre-trained (Δ logit accuracy)"
MIXTURE_GAIN = "fine-tuned on the mixture: gain\nover pre-trained (Δ logit accuracy)"


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
        ax.set_title(f"{t}: Pearson r = {corr.loc[t, 'pearson_logit']:.2f}", fontsize=9)
        ax.set_xlabel(MERGED_GAIN, fontsize=8)
        ax.set_ylabel(MIXTURE_GAIN, fontsize=8)
        if mix is None:
            continue
        j = merged.merge(mix, on=["subset", "size"], suffixes=("_m", "_f"))
        x = metrics.logit(j["test_acc_m"], eps) - metrics.logit(base, eps)
        y = metrics.logit(j["test_acc_f"], eps) - metrics.logit(base, eps)
        single = (j["size"] == 1).to_numpy()
        ax.scatter(x[~single], y[~single], s=10, alpha=0.7, label="mixtures of two or more datasets")
        ax.scatter(x[single], y[single], marker="x", s=30, color="k", label="single datasets (merged = fine-tuned)")
        lo, hi = float(np.min([x.min(), y.min()])), float(np.max([x.max(), y.max()]))
        ax.plot([lo, hi], [lo, hi], lw=0.6, color="grey", label="equal gains")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        f"Test accuracy: merged model vs model fine-tuned on the same mixture{scope}\n"
        f"(mean Pearson r over targets = {corr.loc['average', 'pearson_logit']:.2f}; r leaves single datasets out)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, out_dir / "merged_vs_mixture", formats)
    # similarity metrics vs mixture
    from mergemix.report_tables import metric_label

    for m in METRICS:
        fig, axes = _grid(len(targets))
        closer = "higher" if METRICS[m] == "max" else "lower"
        label = metric_label(m)
        for ax, t in zip(axes, targets):
            _, mix, sim, base = data[t]
            ax.set_title(f"{t}: Pearson r = {corr.loc[t, f'{m}_pearson_logit']:.2f}", fontsize=9)
            ax.set_xlabel(f"{label[0].lower() + label[1:]}\n(target vs mixture; {closer} = closer)", fontsize=8)
            ax.set_ylabel(MIXTURE_GAIN, fontsize=8)
            if mix is None:
                continue
            j = sim.merge(mix, on=["subset", "size"])
            ax.scatter(j[m], metrics.logit(j["test_acc"], eps) - metrics.logit(base, eps), s=10, alpha=0.7)
        fig.suptitle(
            f"{label} vs the gain of the model fine-tuned on the mixture{scope}\n"
            f"(mean Pearson r over targets = {corr.loc['average', f'{m}_pearson_logit']:.2f}; single datasets included)",
            fontsize=10,
        )
        fig.tight_layout()
        _save(fig, out_dir / f"similarity_{m}", formats)


# the overview's bars: selection.csv column, legend in words, colour
OVERVIEW_BARS = [
    ("pretrained", "Pre-trained model", "#9ca3af"),
    ("m2m_merged", "Merge to Mix: merged model of its chosen mixture", "#60a5fa"),
    ("m2m_finetuned", "Merge to Mix: model fine-tuned on its chosen mixture", "#1d4ed8"),
    ("oracle", "Oracle: fine-tuned mixture best on validation", "#f59e0b"),
]


def plot_overview(sel, out_base, formats) -> bytes:
    """One group of bars per target (and the average): test accuracy of the pre-trained model, of
    Merge to Mix's chosen mixture merged and fine-tuned, and of the oracle; random selection (the
    mean over the fine-tuned mixtures) as a black tick. Series the study did not compute are left
    out. Saved as ``out_base.<fmt>``; returns the figure as PNG bytes (for the report's front page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_base = Path(out_base)
    labels = ["average over\ntargets" if t == "average" else str(t) for t in sel["target"]]
    bars = [(c, lab, col) for c, lab, col in OVERVIEW_BARS if c in sel.columns and sel[c].notna().any()]
    sampled = "oracle_scope" in sel.columns and (sel["oracle_scope"] == "sampled mixtures").any()
    n = len(labels)
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 2.0), 4.2))
    x = np.arange(n, dtype=float)
    for k, (col, lab, colour) in enumerate(bars):
        if col == "oracle" and sampled:
            lab = "Oracle among sampled mixtures: best on validation"
        vals = sel[col].to_numpy(dtype=float)
        ax.bar(x - 0.4 + width * (k + 0.5), vals, width, label=lab, color=colour)
    if "random" in sel.columns and sel["random"].notna().any():
        ax.scatter(
            x,
            sel["random"].to_numpy(dtype=float),
            marker="_",
            s=600,
            color="k",
            linewidths=2,
            zorder=3,
            label="Random selection: mean over the fine-tuned mixtures",
        )
    if n:
        ax.axvline(n - 1.5, color="grey", lw=0.6, ls=":")  # the average apart
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30 if n > 8 else 0, ha="right" if n > 8 else "center", fontsize=8)
    ax.set_xlabel("target task")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_title("Merge to Mix per target: merged vs fine-tuned on its chosen mixture, chosen vs oracle", fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: names[i].startswith("Random"))  # the bars first
    ax.legend(
        [handles[i] for i in order],
        [names[i] for i in order],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=2,
        frameon=False,
    )
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _save(fig, out_base, formats)
    return buf.getvalue()
