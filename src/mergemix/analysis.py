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
from mergemix.selection import full_rows, select_best
from mergemix.settings import Analysis
from mergemix.similarity import METRICS
from mergemix.subsets import sort_key, subset_id

SELECTION_COLUMNS = [
    "target",
    "pretrained",
    "m2m_merged",
    "m2m_finetuned",
    "m2m_weighted",
    "all_datasets",
    "similarity",
    "similarity_metric",
    "random",
    "oracle",
    "selected",
    "similarity_subset",
    "oracle_subset",
    # how the choice was searched and what the random/oracle columns range over
    "search",
    "evaluations",
    "exhaustive_evaluations",
    "val_examples",
    "exhaustive_val_examples",
    "mixtures",
    "oracle_scope",
]
# analysis option `mixtures`: which mixtures were fine-tuned (every one, a fixed sample, or none
# beyond all candidates); random, the oracle and the correlations range over the fine-tuned ones
MIXTURE_MODES = {"all": "all mixtures", "sampled": "sampled mixtures", "off": ""}


def correlation_row(target, base_acc, merged, mixture, sim, eps) -> dict:
    """Pearson correlations over the subsets that have both a merged and a fine-tuned model
    (all of them when every mixture is fine-tuned; the sample's with mixture.sample)."""
    row = {"target": target, "n_points": float("nan"), "pearson_acc": float("nan"), "pearson_logit": float("nan")}
    for m in METRICS:
        row[f"{m}_pearson_acc"] = row[f"{m}_pearson_logit"] = float("nan")
    if mixture is None:
        return row
    j = merged.merge(mixture, on=["subset", "size"], suffixes=("_merged", "_mixture"))
    m = metrics.merged_vs_mixture_pearson(j["size"], j["test_acc_merged"], j["test_acc_mixture"], base_acc, eps)
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


def merged_for_correlation(merged: pd.DataFrame, sampled: pd.DataFrame | None) -> pd.DataFrame:
    """Merged models scored on the whole val and test splits: the search's, plus the mixture
    sample's evaluated apart for a budgeted search; one row per subset. Rows without a test
    accuracy (merge_eval.test: selected) are left out; :func:`check_merged_tests` refuses a
    studied mixture left without one."""
    full = full_rows(merged)
    full = full[full["test_acc"].notna()]
    if sampled is not None:
        full = pd.concat([full, sampled[~sampled["subset"].isin(full["subset"])]], ignore_index=True)
    return full[["subset", "size", "val_acc", "test_acc"]]


def check_merged_tests(merged: pd.DataFrame, merged_c: pd.DataFrame, mix_study: pd.DataFrame | None, path) -> None:
    """The correlation study needs the merged test accuracy of every fine-tuned mixture that has a
    merged model: refuse a merge-eval table that scored the val split of one but not its test split
    (merge_eval.test: selected scores every studied mixture's test split; a table from another
    setting or edited by hand would silently shrink the correlation)."""
    from mergemix.tables import TableError

    if mix_study is None:
        return
    lacking = sorted(
        (set(mix_study["subset"]) & set(full_rows(merged)["subset"])) - set(merged_c["subset"]), key=sort_key
    )
    if lacking:
        raise TableError(
            f"{path}: no merged test accuracy for {len(lacking)} fine-tuned mixture(s) of the correlation study "
            f"({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''}); set merge_eval.test: all or rerun the "
            f"merge-eval jobs with the current config: delete {path} and its chunks and rerun snakemake"
        )


def with_selected(mix: pd.DataFrame, fin: dict) -> pd.DataFrame:
    """The mixture table plus the target's selected mixture (its final fine-tune: the same
    hyperparameters and seed as every mixture fine-tune), when a sample does not contain it."""
    if fin["selected"] in set(mix["subset"]):
        return mix
    row = {
        "subset": fin["selected"],
        "size": fin["selected"].count("+") + 1,
        "val_acc": fin["val_acc"],
        "test_acc": fin["test_acc"],
    }
    return pd.concat([mix, pd.DataFrame([row])], ignore_index=True)


def rankings(merged: Mapping[str, pd.DataFrame], top: int | None = None) -> pd.DataFrame:
    """Per target, the merged models scored on the whole val split ranked by the selection rule
    (highest val accuracy, then fewer datasets, then the subset id): rank 1 is the chosen mixture."""
    frames = []
    for t, df in merged.items():
        full = full_rows(df)
        ranked = full.assign(_neg=-full["val_acc"].round(12), _key=full["subset"].map(sort_key))
        ranked = ranked.sort_values(["_neg", "_key"], kind="stable").drop(columns=["_neg", "_key"])
        ranked = ranked.head(top) if top else ranked
        frames.append(
            pd.DataFrame(
                {
                    "target": t,
                    "rank": range(1, len(ranked) + 1),
                    "subset": ranked["subset"].values,
                    "size": ranked["size"].values,
                    "val_acc": ranked["val_acc"].values,
                    "test_acc": ranked["test_acc"].values,
                }
            )
        )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["target", "rank", "subset", "size", "val_acc", "test_acc"])
    )


def analyze(
    targets: Mapping[str, Sequence[str]],
    pretrained_csv,
    merge_eval: Mapping[str, str],
    mixture: Mapping[str, str],
    similarity: Mapping[str, str],
    final: Mapping[str, str],
    out_dir,
    options: Analysis | Mapping | None = None,
    search: Mapping[str, str] | None = None,
    merge_eval_sampled: Mapping[str, str] | None = None,
    mixtures: str = "all",
    weighted: Mapping[str, str] | None = None,
) -> dict[str, pd.DataFrame]:
    """``options``: the ``analysis`` section (:class:`mergemix.settings.Analysis`: ``logit_eps``,
    ``figure_formats``; a mapping or None is converted by ``Analysis.coerce``, with the schema's
    defaults). ``weighted``: {target: JSON of its weighted final fine-tune} (merge_eval.strategy:
    weights), reported as ``m2m_weighted`` beside the binary choice's ``m2m_finetuned``."""
    options = Analysis.coerce(options, "analysis")
    eps, figure_formats = options.logit_eps, list(options.figure_formats)
    if mixtures not in MIXTURE_MODES:
        raise ValueError(f"analysis option mixtures must be one of {', '.join(MIXTURE_MODES)}, got {mixtures!r}")
    out_dir = Path(out_dir)
    from mergemix.tables import check_final, pretrained_test_acc, read_result_table

    pre = read_result_table(pretrained_csv, "pretrained").set_index("target")
    search, merge_eval_sampled = search or {}, merge_eval_sampled or {}
    data, merged_tables = {}, {}
    corr_rows, sel_rows, simsel_rows = [], [], []
    for t, cands in targets.items():
        merged = read_result_table(merge_eval[t], "merge_eval")
        merged_tables[t] = merged
        sampled = read_result_table(merge_eval_sampled[t], "merge_eval") if t in merge_eval_sampled else None
        mix = read_result_table(mixture[t], "mixture") if t in mixture else None
        sim = read_result_table(similarity[t], "similarity")
        fin = check_final(io.read_json(final[t]), final[t]) if t in final else None  # final.enabled: false
        base = pretrained_test_acc(pre, t, pretrained_csv)
        studied = mix is not None and mixtures != "off"  # mixtures beyond all candidates were fine-tuned
        mix_study = (with_selected(mix, fin) if fin is not None else mix) if studied else None
        merged_c = merged_for_correlation(merged, sampled)
        check_merged_tests(merged, merged_c, mix_study, merge_eval[t])
        data[t] = (merged_c, mix_study, sim, base)
        corr_rows.append(correlation_row(t, base, merged_c, mix_study, sim, eps))

        choices = similarity_choices(sim)
        simsel = {"target": t}
        for m, sid in choices.items():
            simsel[m] = _acc_of(mix_study, sid) if studied else float("nan")
        simsel_rows.append(simsel)
        best = select_best(merged)
        oracle = select_best(mix_study)["subset"] if studied else None
        cost = io.read_json(search[t]) if t in search else {}
        sel_rows.append(
            {
                "target": t,
                "pretrained": base,
                "m2m_merged": float(best["test_acc"]),
                "m2m_finetuned": float(fin["test_acc"]) if fin is not None else float("nan"),
                "m2m_weighted": float(io.read_json(weighted[t])["test_acc"]) if t in (weighted or {}) else float("nan"),
                "all_datasets": _acc_of(mix, subset_id(cands)),
                "random": float(mix_study["test_acc"].mean()) if studied else float("nan"),
                "oracle": _acc_of(mix_study, oracle) if studied else float("nan"),
                "selected": best["subset"],
                "oracle_subset": oracle or "",
                "search": cost.get("strategy", ""),
                "evaluations": cost.get("evaluations", float("nan")),
                "exhaustive_evaluations": cost.get("exhaustive_evaluations", float("nan")),
                "val_examples": cost.get("val_examples", float("nan")),
                "exhaustive_val_examples": cost.get("exhaustive_val_examples", float("nan")),
                "mixtures": len(mix_study) if studied else float("nan"),
                "oracle_scope": MIXTURE_MODES[mixtures] if studied else "",
                "_sim_choices": choices,
            }
        )

    simsel_df = with_average(pd.DataFrame(simsel_rows, columns=["target", *METRICS]))
    avg = simsel_df.iloc[-1]
    scored = {m: avg[m] for m in METRICS if not (isinstance(avg[m], float) and math.isnan(avg[m]))}
    best_metric = max(scored, key=lambda m: (scored[m], -list(METRICS).index(m))) if scored else ""
    sim_choices = {r["target"]: r["_sim_choices"] for r in sel_rows}  # for the report's similarity table
    for r, s in zip(sel_rows, simsel_rows):
        choices = r.pop("_sim_choices")
        r["similarity_metric"] = best_metric
        r["similarity"] = s[best_metric] if best_metric else float("nan")
        r["similarity_subset"] = choices[best_metric] if best_metric else ""
    sel_df = with_average(pd.DataFrame(sel_rows)[SELECTION_COLUMNS])
    avg = sel_df["target"] == "average"
    sel_df.loc[avg, "similarity_metric"] = best_metric
    for col in ("search", "oracle_scope"):  # one value for the study when all targets agree
        vals = set(sel_df.loc[~avg, col])
        sel_df.loc[avg, col] = vals.pop() if len(vals) == 1 else "mixed"
    corr_df = with_average(pd.DataFrame(corr_rows))

    io.write_csv(out_dir / "correlation.csv", corr_df)
    io.write_csv(out_dir / "rankings.csv", rankings(merged_tables))
    io.write_csv(out_dir / "selection.csv", sel_df)
    io.write_csv(out_dir / "similarity_selection.csv", simsel_df)
    from mergemix.figures import plot_all

    plot_all(data, corr_df, out_dir / "figures", eps, figure_formats, sampled=mixtures == "sampled")
    # snakemake --report: the overview figure and HTML versions of the tables (the CSVs above are the data)
    from mergemix.figures import plot_overview
    from mergemix.report_tables import write_report

    overview_png = plot_overview(sel_df, out_dir / "figures" / "overview", figure_formats)
    write_report(out_dir / "report", sel_df, corr_df, simsel_df, sim_choices, best_metric, overview_png)
    return {"correlation": corr_df, "selection": sel_df, "similarity_selection": simsel_df}


TABLE_COLUMNS = SELECTION_COLUMNS[: SELECTION_COLUMNS.index("selected") + 1]  # the paper's Table 1 part


def format_table(df: pd.DataFrame) -> str:
    """The selection table as text, with a footer on how the choice was searched and what the
    random and oracle columns range over."""
    cols = [c for c in TABLE_COLUMNS if c in df.columns and c != "selected"]
    text = df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
    rows = df[df["target"] != "average"]
    if "search" in df.columns and len(rows):
        ev, ex = rows["evaluations"].sum(), rows["exhaustive_evaluations"].sum()
        vx, vex = rows["val_examples"].sum(), rows["exhaustive_val_examples"].sum()
        text += (
            f"\nsearch: {', '.join(sorted(set(rows['search'].astype(str))))}; {ev:,.0f} merged evaluations of "
            f"{ex:,.0f} exhaustive ({ev / ex:.1%}), {vx:,.0f} val examples of {vex:,.0f} ({vx / vex:.1%})"
        )
        scope = set(rows["oracle_scope"].fillna("").astype(str)) - {""}
        if scope == {"sampled mixtures"}:
            text += (
                f"\nrandom and oracle: among sampled mixtures ({rows['mixtures'].min():.0f}-{rows['mixtures'].max():.0f} "
                "per target), not all 2^N-1: 'oracle among sampled'"
            )
    return text
