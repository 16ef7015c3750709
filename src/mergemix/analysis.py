"""Correlations, baselines and the paper's Table 1 layout from the per-target CSVs.

Every choice is made on validation accuracy (or a similarity score computed on validation
embeddings); every reported number is a test accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from mergemix import io, metrics
from mergemix.similarity import METRICS
from mergemix.stages import select_best
from mergemix.subsets import subset_id

SELECTION_COLUMNS = [
    "target", "pretrained", "m2m_merged", "m2m_finetuned", "all_datasets", "similarity", "similarity_metric",
    "random", "oracle", "selected", "similarity_subset", "oracle_subset",
]


def has_all_mixtures(mixture: pd.DataFrame | None, merged: pd.DataFrame) -> bool:
    return mixture is not None and set(merged["subset"]) <= set(mixture["subset"])


def correlation_row(target, base_acc, merged, mixture, sim, eps) -> dict:
    row = {"target": target, "n_points": float("nan"), "pearson_acc": float("nan"), "pearson_logit": float("nan")}
    for m in METRICS:
        row[f"{m}_pearson_acc"] = row[f"{m}_pearson_logit"] = float("nan")
    if not has_all_mixtures(mixture, merged):
        return row
    j = merged.merge(mixture, on=["subset", "size"], suffixes=("_merged", "_mixture"))
    m = metrics.merged_vs_mixture_pearson(j["size"], j["test_acc_merged"], j["test_acc_mixture"], base_acc)
    row.update(pearson_acc=m[0], pearson_logit=m[1], n_points=m[2])
    js = sim.merge(mixture, on=["subset", "size"])
    y_logit = metrics.logit(js["test_acc"], eps) - metrics.logit(base_acc, eps)
    for name in METRICS:
        row[f"{name}_pearson_acc"] = metrics.pearson(js[name], js["test_acc"])
        row[f"{name}_pearson_logit"] = metrics.pearson(js[name], y_logit)
    return row


def _acc_of(df: pd.DataFrame | None, sid: str) -> float:
    if df is None:
        return float("nan")
    hit = df.loc[df["subset"] == sid, "test_acc"]
    return float(hit.iloc[0]) if len(hit) else float("nan")


def similarity_choices(sim: pd.DataFrame) -> dict[str, str]:
    """Subset chosen by each metric (max for cosine, min for L2; ties to the smallest subset)."""
    return {m: select_best(sim, m, maximize=(d == "max"))["subset"] for m, d in METRICS.items()}


def with_average(df: pd.DataFrame, key: str = "target") -> pd.DataFrame:
    num = df.select_dtypes("number")
    avg = {c: num[c].mean() for c in num.columns}  # skips NaN
    avg[key] = "average"
    return pd.concat([df, pd.DataFrame([avg])], ignore_index=True)


def analyze(
    targets: Mapping[str, Sequence[str]],
    pretrained_csv,
    merge_eval: Mapping[str, str],
    mixture: Mapping[str, str],
    similarity: Mapping[str, str],
    final: Mapping[str, str],
    out_dir,
    eps: float = metrics.LOGIT_EPS,
    figure_formats: Sequence[str] = ("png", "pdf"),
) -> dict[str, pd.DataFrame]:
    out_dir = Path(out_dir)
    pre = pd.read_csv(pretrained_csv).set_index("target")
    data = {}
    corr_rows, sel_rows, simsel_rows = [], [], []
    for t, cands in targets.items():
        merged = pd.read_csv(merge_eval[t])
        mix = pd.read_csv(mixture[t]) if t in mixture else None
        sim = pd.read_csv(similarity[t])
        fin = io.read_json(final[t])
        base = float(pre.loc[t, "test_acc"])
        data[t] = (merged, mix, sim, base)
        corr_rows.append(correlation_row(t, base, merged, mix, sim, eps))

        complete = has_all_mixtures(mix, merged)
        choices = similarity_choices(sim)
        simsel = {"target": t}
        for m, sid in choices.items():
            simsel[m] = _acc_of(mix, sid) if complete else float("nan")
        simsel_rows.append(simsel)
        best = select_best(merged)
        oracle = select_best(mix)["subset"] if complete else None
        sel_rows.append(
            {
                "target": t,
                "pretrained": base,
                "m2m_merged": float(best["test_acc"]),
                "m2m_finetuned": float(fin["test_acc"]),
                "all_datasets": _acc_of(mix, subset_id(cands)),
                "random": float(mix["test_acc"].mean()) if complete else float("nan"),
                "oracle": _acc_of(mix, oracle) if complete else float("nan"),
                "selected": best["subset"],
                "oracle_subset": oracle or "",
                "_sim_choices": choices,
            }
        )

    simsel_df = with_average(pd.DataFrame(simsel_rows, columns=["target", *METRICS]))
    avg = simsel_df.iloc[-1]
    scored = {m: avg[m] for m in METRICS if not (isinstance(avg[m], float) and math.isnan(avg[m]))}
    best_metric = max(scored, key=lambda m: (scored[m], -list(METRICS).index(m))) if scored else ""
    for r, s in zip(sel_rows, simsel_rows):
        choices = r.pop("_sim_choices")
        r["similarity_metric"] = best_metric
        r["similarity"] = s[best_metric] if best_metric else float("nan")
        r["similarity_subset"] = choices[best_metric] if best_metric else ""
    sel_df = with_average(pd.DataFrame(sel_rows)[SELECTION_COLUMNS])
    sel_df.loc[sel_df["target"] == "average", "similarity_metric"] = best_metric
    corr_df = with_average(pd.DataFrame(corr_rows))

    io.write_csv(out_dir / "correlation.csv", corr_df)
    io.write_csv(out_dir / "selection.csv", sel_df)
    io.write_csv(out_dir / "similarity_selection.csv", simsel_df)
    from mergemix.figures import plot_all

    plot_all(data, corr_df, out_dir / "figures", eps, figure_formats)
    return {"correlation": corr_df, "selection": sel_df, "similarity_selection": simsel_df}


def format_table(df: pd.DataFrame) -> str:
    cols = [c for c in SELECTION_COLUMNS if c in df.columns and c not in ("similarity_subset", "oracle_subset")]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
