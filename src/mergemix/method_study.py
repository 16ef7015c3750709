"""Which merge method is the best surrogate for fine-tuning on the mixture (``merge_eval.methods``).

For every method and target, from the method's merge-eval table and the target's mixture table
(the fine-tuned models are shared by every method): the Pearson correlation of merged against
mixture-fine-tuned test accuracy over the mixtures of two or more datasets (on accuracies and on
logit deltas over the pre-trained model, as section 4.2 of the paper does for the uniform average),
the method's M2M choice (best merged val accuracy, the selection rule of the study), its merged test
accuracy and the test accuracy of the model fine-tuned on that choice. Choices are made on val;
every reported accuracy is on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from mergemix import io, metrics

COLUMNS = [
    "method",
    "target",
    "options",
    "tuned",
    "n_points",
    "pearson_acc",
    "pearson_logit",
    "m2m_subset",
    "m2m_merged",
    "m2m_finetuned",
    "oracle",
    "evaluations",
]


def method_rows(
    method: str, target: str, merged: pd.DataFrame, mixture: pd.DataFrame | None, base_acc: float, eps: float
) -> dict:
    """One row of the method comparison (``merged``: a merge-eval table; ``mixture``: the target's
    mixture table, or None when no mixture was fine-tuned; ``eps``: ``analysis.logit_eps``)."""
    from mergemix.selection import full_rows, select_best

    full = full_rows(merged)
    best = select_best(full)
    row = {
        "method": method,
        "target": target,
        "m2m_subset": best["subset"],
        "m2m_merged": float(best["test_acc"]),
        "evaluations": int(len(full)),
        "n_points": 0,
        "pearson_acc": float("nan"),
        "pearson_logit": float("nan"),
        "m2m_finetuned": float("nan"),
        "oracle": float("nan"),
    }
    if mixture is not None and len(mixture):
        j = full[full["test_acc"].notna()].merge(mixture, on=["subset", "size"], suffixes=("_merged", "_mixture"))
        r_acc, r_logit, n = metrics.merged_vs_mixture_pearson(
            j["size"], j["test_acc_merged"], j["test_acc_mixture"], base_acc, eps
        )
        row.update(pearson_acc=r_acc, pearson_logit=r_logit, n_points=n)
        hit = mixture.loc[mixture["subset"] == best["subset"], "test_acc"]
        row["m2m_finetuned"] = float(hit.iloc[0]) if len(hit) else float("nan")
        row["oracle"] = float(select_best(mixture)["test_acc"])
    return row


def compare_methods(
    merge_eval: Mapping[str, Mapping[str, str]],
    mixture: Mapping[str, str],
    pretrained_csv,
    out_csv,
    figure: str | None = None,
    figure_formats: Sequence[str] = ("png",),
    options: Mapping[str, dict] | None = None,
    tuned: Mapping[tuple, str] | None = None,
    *,
    logit_eps: float,
) -> pd.DataFrame:
    """``merge_eval``: {method: {target: merge-eval CSV}}; ``mixture``: {target: mixture CSV};
    ``options``: {method: fixed options}; ``tuned``: {(method, target): tune-method JSON}, whose
    options the method's merge-eval used for that target; ``logit_eps``: ``analysis.logit_eps``. Writes one row per method and target
    (with the options used, as JSON) plus one ``average`` row per method."""
    import json

    from mergemix.tables import pretrained_test_acc, read_result_table
    from mergemix.tuning import tuned_options

    pre = read_result_table(pretrained_csv, "pretrained").set_index("target")
    mixes = {t: read_result_table(p, "mixture") for t, p in mixture.items()}
    rows = []
    for method, per_target in merge_eval.items():
        for t, path in per_target.items():
            base = pretrained_test_acc(pre, t, pretrained_csv)
            row = method_rows(method, t, read_result_table(path, "merge_eval"), mixes.get(t), base, logit_eps)
            used = dict((options or {}).get(method) or {})
            hit = (tuned or {}).get((method, t))
            if hit is not None:
                used.update(tuned_options(hit))
            rows.append({**row, "options": json.dumps(used, sort_keys=True), "tuned": hit is not None})
    df = pd.DataFrame(rows, columns=COLUMNS)
    averages = []
    for method, g in df.groupby("method", sort=False):
        num = g.select_dtypes("number").mean()  # skips NaN
        num = num.drop(labels=["tuned"], errors="ignore")
        averages.append(
            {
                **num.to_dict(),
                "method": method,
                "target": "average",
                "m2m_subset": "",
                "options": "",
                "tuned": bool(g["tuned"].any()),
            }
        )
    df = pd.concat([df, pd.DataFrame(averages, columns=COLUMNS)], ignore_index=True)
    io.write_csv(out_csv, df)
    if figure:
        plot_methods(df, figure, figure_formats)
    return df


def plot_methods(df: pd.DataFrame, out_stem, formats: Sequence[str] = ("png",)) -> None:
    """Two panels per method: mean Pearson (logit deltas) of merged vs mixture-fine-tuned accuracy,
    and the mean test accuracy of the model fine-tuned on the method's choice (with the oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = df[df["target"] == "average"].set_index("method")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [f"{m}\n(tuned on val)" if bool(avg.at[m, "tuned"]) else m for m in avg.index]
    axes[0].bar(names, avg["pearson_logit"], color="tab:blue")
    axes[0].set_ylabel("Pearson r, merged vs mixture\n(logit-accuracy deltas)")
    axes[0].set_title("Surrogate quality (mean over targets)")
    axes[0].axhline(0, color="black", lw=0.6)
    axes[1].bar(names, avg["m2m_finetuned"], color="tab:green", label="fine-tuned on the method's choice")
    if avg["oracle"].notna().any():
        axes[1].axhline(float(avg["oracle"].mean()), color="tab:red", ls="--", label="oracle")
    lo = float(pd.concat([avg["m2m_finetuned"], avg["oracle"]]).min())
    axes[1].set_ylim(max(0.0, lo - 0.05), None)
    axes[1].set_ylabel("test accuracy (mean over targets)")
    axes[1].set_title("Choice quality")
    axes[1].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    from mergemix.figures import _save

    _save(fig, Path(out_stem), formats)  # atomic, one file per format
