"""HTML versions of the study's tables for ``snakemake --report`` (its "Tables" category and the
front page): the selection table in the paper's Table 1/2 layout, the correlation table and the
per-similarity-metric table (the paper's Tables 5/6). The CSVs stay the study's data; these files
only present the same numbers, with column headers in words.

Every page is a standalone HTML document (the report shows it in a frame), with inline styles and
no links or scripts; :func:`front_page_html` is a fragment (the overview figure, embedded, and the
selection table) that the workflow description of the report includes.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from mergemix import io
from mergemix.similarity import METRICS

# the six metrics of appendix A.4 in words (paper, Tables 5/6), with their equation numbers
METRIC_LABELS: dict[str, str] = {
    "avg_max_cos": "Average of max cosine similarity",
    "avg_min_l2": "Average of min L2 distance",
    "avg_avg_cos": "Average of average cosine similarity",
    "avg_avg_l2": "Average of average L2 distance",
    "max_max_cos": "Max of max cosine similarity",
    "min_min_l2": "Min of min L2 distance",
}
METRIC_EQUATIONS = {m: 8 + i for i, m in enumerate(METRICS)}  # eqs. (8)-(13), in METRICS order

# selection.csv column -> header in words (the paper's Table 1/2 columns, pre-trained first)
SELECTION_HEADERS = {
    "pretrained": "Pre-trained model",
    "m2m_merged": "Merge to Mix (merged model)",
    "m2m_finetuned": "Merge to Mix (fine-tuned model)",
    "m2m_weighted": "Merge to Mix (weighted fine-tune)",
    "all_datasets": "All datasets",
    "similarity": "Similarity selection",
    "random": "Random selection",
    "oracle": "Oracle",
}
# the selection methods the paper bolds the best of, per row (the oracle and pre-trained aside)
BOLDED = ["m2m_merged", "m2m_finetuned", "m2m_weighted", "all_datasets", "similarity", "random"]
EMPTY = "–"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2rem; color: #1f2937; }
h1 { font-size: 1.25rem; margin: 0 0 .4rem 0; }
h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem 0; }
p { max-width: 60rem; line-height: 1.45; font-size: .9rem; }
.mm-table { border-collapse: collapse; font-size: .85rem; margin: .4rem 0 .8rem 0; }
.mm-table th, .mm-table td { border-bottom: 1px solid #d1d5db; padding: .3rem .55rem; text-align: right; vertical-align: top; }
.mm-table th { background: #f3f4f6; font-weight: 600; text-align: center; }
.mm-table th.mm-row, .mm-table td.mm-row { text-align: left; }
.mm-table tr.mm-average td { border-top: 2px solid #6b7280; }
.mm-table tr.mm-average td.mm-row { font-weight: 600; }
.mm-table td.mm-empty { color: #9ca3af; text-align: center; }
.mm-table .mm-best { font-weight: 700; }
.mm-table .mm-chosen { background: #fef3c7; }
.mm-table .mm-subset { display: block; font-size: .75rem; color: #6b7280; font-weight: 400; }
.mm-table td.mm-text { text-align: left; }
.mm-note { font-size: .8rem; color: #4b5563; }
"""


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, str) and pd.isna(v))


def _num(v, digits: int = 3) -> str:
    return EMPTY if _isnan(v) else f"{float(v):.{digits}f}"


def _cell(v, digits: int = 3, classes: Sequence[str] = (), sub: str = "") -> str:
    if _isnan(v):
        return f'<td class="mm-empty" title="not computed in this study">{EMPTY}</td>'
    cls = f' class="{" ".join(classes)}"' if classes else ""
    sub = f'<span class="mm-subset">{_esc(sub)}</span>' if sub else ""
    return f"<td{cls}>{_num(v, digits)}{sub}</td>"


def _text(v) -> str:
    return EMPTY if _isnan(v) or v == "" else str(v)


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_esc(title)}</h1>\n"
        f"{body}\n</body>\n</html>\n"
    )


def _has_values(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and df[col].notna().any()


def metric_label(metric: str) -> str:
    """A similarity metric in words, e.g. ``min_min_l2`` -> 'Min of min L2 distance'."""
    return METRIC_LABELS.get(metric, metric)


# ---------------------------------------------------------------------------------------------
# selection table (Table 1/2)


def selection_columns(sel: pd.DataFrame) -> list[str]:
    """The accuracy columns shown: the weighted fine-tune only when the study ran one."""
    return [c for c in SELECTION_HEADERS if c in sel.columns and (c != "m2m_weighted" or _has_values(sel, c))]


def _selection_header(sel: pd.DataFrame, col: str) -> str:
    head = SELECTION_HEADERS[col]
    if col == "similarity":
        metric = str(sel["similarity_metric"].iloc[-1]) if "similarity_metric" in sel.columns else ""
        if metric and not _isnan(metric):
            head += f'<span class="mm-subset">{_esc(metric_label(metric))}</span>'
    if col == "oracle" and "oracle_scope" in sel.columns and (sel["oracle_scope"] == "sampled mixtures").any():
        head = "Oracle among sampled mixtures"
    if col == "random" and "oracle_scope" in sel.columns and (sel["oracle_scope"] == "sampled mixtures").any():
        head = "Random selection (sampled mixtures)"
    return head if col == "similarity" else _esc(head)


def selection_table(sel: pd.DataFrame) -> str:
    """The test accuracies, one row per target and the average; per row the best selection method
    (oracle and pre-trained aside) in bold, as in the paper."""
    cols = selection_columns(sel)
    head = "".join(f"<th>{_selection_header(sel, c)}</th>" for c in cols)
    rows = []
    for _, r in sel.iterrows():
        avg = r["target"] == "average"
        shown = [round(float(r[c]), 3) for c in BOLDED if c in cols and not _isnan(r[c])]
        best = max(shown) if shown else None
        cells = []
        for c in cols:
            bold = c in BOLDED and best is not None and not _isnan(r[c]) and round(float(r[c]), 3) == best
            cells.append(_cell(r[c], classes=["mm-best"] if bold else []))
        label = "Average" if avg else _esc(r["target"])
        rows.append(
            f'<tr class="{"mm-average" if avg else "mm-target"}"><td class="mm-row">{label}</td>{"".join(cells)}</tr>'
        )
    return (
        '<table class="mm-table mm-selection">\n<thead><tr><th class="mm-row">Target task</th>'
        f"{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )


def choices_table(sel: pd.DataFrame) -> str:
    """Per target: the mixture each method chose, and what the search and the mixture study cost."""
    rows = []
    for _, r in sel[sel["target"] != "average"].iterrows():
        ev, ex = r.get("evaluations"), r.get("exhaustive_evaluations")
        vx, vex = r.get("val_examples"), r.get("exhaustive_val_examples")
        evals = EMPTY if _isnan(ev) else f"{ev:,.0f} of {ex:,.0f}"
        vals = EMPTY if _isnan(vx) else f"{vx:,.0f} of {vex:,.0f}"
        mix = EMPTY if _isnan(r.get("mixtures")) else f"{r['mixtures']:,.0f}"
        rows.append(
            f'<tr class="mm-target"><td class="mm-row">{_esc(r["target"])}</td>'
            f'<td class="mm-text">{_esc(_text(r.get("selected")))}</td>'
            f'<td class="mm-text">{_esc(_text(r.get("similarity_subset")))}</td>'
            f'<td class="mm-text">{_esc(_text(r.get("oracle_subset")))}</td>'
            f'<td class="mm-text">{_esc(_text(r.get("search")))}</td><td>{evals}</td><td>{vals}</td><td>{mix}</td></tr>'
        )
    return (
        '<table class="mm-table mm-choices">\n<thead><tr><th class="mm-row">Target task</th>'
        "<th>Merge to Mix chose</th><th>Similarity selection chose</th><th>Oracle (best fine-tuned on validation)</th>"
        "<th>Search strategy</th><th>Merged models evaluated (of all subsets)</th>"
        "<th>Validation examples scored (of exhaustive)</th><th>Mixtures fine-tuned</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


def search_note(sel: pd.DataFrame) -> str:
    rows = sel[sel["target"] != "average"]
    if "search" not in sel.columns or not len(rows) or rows["exhaustive_evaluations"].isna().all():
        return ""
    ev, ex = rows["evaluations"].sum(), rows["exhaustive_evaluations"].sum()
    vx, vex = rows["val_examples"].sum(), rows["exhaustive_val_examples"].sum()
    return (
        f"Search: {_esc(', '.join(sorted(set(rows['search'].astype(str)))))}; {ev:,.0f} merged models evaluated of "
        f"{ex:,.0f} for an exhaustive search ({ev / ex:.1%}), {vx:,.0f} validation examples scored of {vex:,.0f} "
        f"({vx / vex:.1%})."
    )


def selection_html(sel: pd.DataFrame) -> str:
    metric = str(sel["similarity_metric"].iloc[-1]) if "similarity_metric" in sel.columns else ""
    metric = "" if _isnan(metric) or metric == "nan" else metric
    sim = (
        f"Similarity selection reports the metric <b>{_esc(metric_label(metric))}</b> (<code>{_esc(metric)}</code>), the "
        "one of the six whose chosen mixtures have the highest test accuracy averaged over targets (the paper's "
        "protocol, section 4.3: it favours this baseline); each target's mixture is chosen by the similarity score "
        "alone. All six are compared in the similarity selection table."
        if metric
        else "Similarity selection is empty: the metric to report is chosen on the test accuracy of the mixtures "
        "each metric picks, fine-tuned by the mixture study, which this study did not run (mixture.enabled: false)."
    )
    body = (
        "<p>Test accuracy on each target task of the model each selection method leads to. Every choice is made on "
        "validation data; every number is a test accuracy. Bold: the best selection method in the row (the oracle and "
        "the pre-trained model aside, as in the paper). "
        f"{EMPTY}: not computed in this study.</p>\n"
        + selection_table(sel)
        + f'\n<p class="mm-note">{sim}</p>\n<h2>The mixtures chosen</h2>\n'
        + choices_table(sel)
        + (f'\n<p class="mm-note">{search_note(sel)}</p>' if search_note(sel) else "")
    )
    return _document("Selection: test accuracy per target (Table 1/2 layout)", body)


# ---------------------------------------------------------------------------------------------
# correlation table (section 4.2, Figure 1)


def correlation_html(corr: pd.DataFrame) -> str:
    rows = []
    for _, r in corr.iterrows():
        avg = r["target"] == "average"
        label = "Average" if avg else _esc(r["target"])
        n = "" if avg else EMPTY if _isnan(r["n_points"]) else f"{r['n_points']:.0f}"
        rows.append(
            f'<tr class="{"mm-average" if avg else "mm-target"}"><td class="mm-row">{label}</td><td>{n}</td>'
            f"{_cell(r['pearson_logit'], 2)}{_cell(r['pearson_acc'], 2)}</tr>"
        )
    merged = (
        '<table class="mm-table mm-correlation">\n<thead><tr><th class="mm-row">Target task</th>'
        "<th>Mixtures of two or more datasets compared</th><th>Pearson r, gains over pre-trained (Δ logit accuracy)</th>"
        "<th>Pearson r, test accuracies</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )
    head = "".join(
        f'<th>{_esc(metric_label(m))} (eq. {METRIC_EQUATIONS[m]})<span class="mm-subset">'
        f"{'higher' if METRICS[m] == 'max' else 'lower'} = closer</span></th>"
        for m in METRICS
    )
    rows = []
    for _, r in corr.iterrows():
        avg = r["target"] == "average"
        label = "Average" if avg else _esc(r["target"])
        cells = "".join(
            _cell(
                r[f"{m}_pearson_logit"],
                2,
                sub="" if _isnan(r[f"{m}_pearson_acc"]) else f"accuracy: {r[f'{m}_pearson_acc']:.2f}",
            )
            for m in METRICS
        )
        rows.append(f'<tr class="{"mm-average" if avg else "mm-target"}"><td class="mm-row">{label}</td>{cells}</tr>')
    similarity = (
        '<table class="mm-table mm-correlation-similarity">\n<thead><tr><th class="mm-row">Target task</th>'
        f"{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )
    body = (
        "<p>Is the merged model a good stand-in for fine-tuning on the same mixture? Pearson correlation, per target, "
        "between the test accuracy of the merged model of a mixture and that of the model fine-tuned on it, over the "
        "mixtures of two or more datasets that have both (a single dataset's merged model is its fine-tuned model, "
        "so those are left out); the average row is the mean over targets.</p>\n"
        + merged
        + "\n<h2>Similarity scores against the fine-tuned mixture's accuracy</h2>\n<p>Pearson r between each "
        "similarity score of a mixture and the gain of the model fine-tuned on it over the pre-trained model "
        "(Δ logit accuracy; small print: against its test accuracy), over every fine-tuned mixture, single datasets "
        "included. A useful cosine score correlates positively, a useful L2 distance negatively.</p>\n" + similarity
    )
    return _document("Correlation: merged models and similarity scores against fine-tuning", body)


# ---------------------------------------------------------------------------------------------
# per-metric similarity selection (Tables 5/6)


def similarity_html(simsel: pd.DataFrame, choices: Mapping[str, Mapping[str, str]], best_metric: str) -> str:
    """``simsel``: similarity_selection.csv (target x metric test accuracy, average row last);
    ``choices``: {target: {metric: chosen subset}}; ``best_metric``: the one the selection table reports."""
    head = "".join(
        f'<th class="{"mm-chosen" if m == best_metric else ""}">{_esc(metric_label(m))} (eq. {METRIC_EQUATIONS[m]})'
        f'<span class="mm-subset">{"highest" if METRICS[m] == "max" else "lowest"} score chosen'
        f"{'; in the selection table' if m == best_metric else ''}</span></th>"
        for m in METRICS
    )
    rows = []
    for _, r in simsel.iterrows():
        avg = r["target"] == "average"
        label = "Average" if avg else _esc(r["target"])
        cells = []
        for m in METRICS:
            sub = "" if avg else choices.get(r["target"], {}).get(m, "")
            cls = ["mm-chosen"] if m == best_metric else []
            if _isnan(r[m]) and sub:  # no fine-tuned accuracy, the choice still shown
                cells.append(
                    f'<td class="mm-empty {" ".join(cls)}">{EMPTY}<span class="mm-subset">{_esc(sub)}</span></td>'
                )
            else:
                cells.append(_cell(r[m], 3, classes=cls, sub=sub))
        rows.append(
            f'<tr class="{"mm-average" if avg else "mm-target"}"><td class="mm-row">{label}</td>{"".join(cells)}</tr>'
        )
    table = (
        '<table class="mm-table mm-similarity">\n<thead><tr><th class="mm-row">Target task</th>'
        f"{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    )
    averages = simsel[simsel["target"] == "average"]
    best_avg = float(averages[best_metric].iloc[0]) if best_metric and len(averages) else float("nan")
    chosen = (
        f"The selection table's similarity column reports <b>{_esc(metric_label(best_metric))}</b> "
        f"(<code>{_esc(best_metric)}</code>, highlighted): the highest average in the last row ({best_avg:.4f}; "
        "averages are compared unrounded, exact ties go to the metric further left). That choice looks at test accuracy, as the paper's does (section 4.3, Tables 5/6: it "
        "favours the similarity baseline); each target's mixture is picked by its score alone."
        if best_metric
        else "No metric is reported in the selection table: the choice is made on the test accuracy of the mixtures "
        "the metrics pick, fine-tuned by the mixture study, which this study did not run (the mixture each metric "
        "picks is shown under the dash)."
    )
    body = (
        "<p>Test accuracy of the model fine-tuned on the mixture each of the six similarity scores picks per target "
        "(small print: the mixture). Each score compares the pre-trained model's embeddings of the target with those "
        "of a mixture's datasets; the mixture with the highest cosine score or the lowest L2 distance is picked "
        "(ties: fewer datasets).</p>\n" + table + f'\n<p class="mm-note">{chosen}</p>'
    )
    return _document("Similarity selection: the six metrics (Tables 5/6 layout)", body)


# ---------------------------------------------------------------------------------------------
# the report's front page and the writer


# Styles of the report's front page, only while the fragment is shown (``:has``): Snakemake's report
# centres its start page vertically, so a description taller than the window would lose its top;
# it also narrows the description to max-w-lg, too narrow for the table.
FRONT_STYLE = """
div.h-screen:has(.mm-front) { align-items: flex-start; }
div.prose:has(.mm-front) { max-width: 48rem; }
div.prose:has(.mm-front) div.section > h1 { font-size: 1.2rem; margin: 1.2rem 0 .5rem 0; }
div.prose:has(.mm-front) h1.title { font-size: 1.6rem; margin-bottom: .8rem; }
.mm-front table.mm-table { font-size: .8rem; margin: .4rem 0; }
.mm-front table.mm-table th, .mm-front table.mm-table td { padding: .25rem .4rem; text-align: right; vertical-align: bottom; }
.mm-front table.mm-table th.mm-row, .mm-front table.mm-table td.mm-row { text-align: left; }
.mm-front tr.mm-average td { border-top: 2px solid #6b7280; }
.mm-front tr.mm-average td.mm-row { font-weight: 600; }
.mm-front .mm-best { font-weight: 700; }
.mm-front .mm-subset { display: block; font-size: .7rem; color: #6b7280; font-weight: 400; }
.mm-front td.mm-empty { color: #9ca3af; text-align: center; }
"""


def front_page_html(sel: pd.DataFrame, overview_png: bytes | None) -> str:
    """A fragment for the workflow description: the overview figure (embedded as a data URI) and
    the selection table."""
    img = ""
    if overview_png:
        uri = "data:image/png;base64," + base64.b64encode(overview_png).decode("ascii")
        img = (
            f'<p><img class="mm-overview" src="{uri}" alt="Test accuracy per target: pre-trained, Merge to Mix merged '
            'and fine-tuned, and the oracle" style="max-width:100%;height:auto"></p>\n'
        )
    return (
        f"<style>{FRONT_STYLE}</style>\n"
        + '<div class="mm-front">\n'
        + img
        + '<div style="overflow-x:auto">\n'
        + selection_table(sel)
        + "\n</div>\n</div>\n"
    )


def write_report(
    out_dir,
    sel: pd.DataFrame,
    corr: pd.DataFrame,
    simsel: pd.DataFrame,
    choices: Mapping[str, Mapping[str, str]],
    best_metric: str,
    overview_png: bytes | None = None,
) -> list[Path]:
    """Write selection.html, correlation.html, similarity_selection.html and front_page.html to
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = {
        "selection.html": selection_html(sel),
        "correlation.html": correlation_html(corr),
        "similarity_selection.html": similarity_html(simsel, choices, best_metric),
        "front_page.html": front_page_html(sel, overview_png),
    }
    paths = []
    for name, text in pages.items():
        with io.atomic_path(out_dir / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        paths.append(out_dir / name)
    return paths
