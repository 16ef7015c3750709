"""Checks of the result tables (CSV) the pipeline writes, before they are read into results.

A table changed by hand, by another tool or by another version could otherwise give a silently
wrong selection or correlation: a missing column, a non-numeric or out-of-range accuracy, a subset
listed twice. :func:`check_result_table` refuses it, naming the file, the column, the row and the
value.
"""

from __future__ import annotations

import math
from pathlib import Path

# merge_eval_rows: one merge-eval job's rows (a halving search scores a subset on several val slices:
# one row per subset and slice); merge_eval: the gathered table, one row per subset
KINDS = ("merge_eval", "merge_eval_rows", "mixture", "similarity", "pretrained")
_ACC = ("val_acc", "test_acc")


class TableError(ValueError):
    """A result table that cannot be trusted; the message names the file and the fix."""


def _columns(kind: str) -> list[str]:
    if kind in ("merge_eval", "merge_eval_rows", "mixture"):
        return ["subset", "size", *_ACC]
    if kind == "similarity":
        from mergemix.similarity import METRICS

        return ["subset", "size", *METRICS]
    if kind == "pretrained":
        return ["target", *_ACC]
    raise ValueError(f"unknown result table kind {kind!r}; allowed: {', '.join(KINDS)}")


def _show(v) -> str:
    return repr(v.item() if hasattr(v, "item") else v)  # 1.7, not np.float64(1.7)


def _fix(path) -> str:
    return f"delete {path} and rerun snakemake to rebuild it"


def check_result_table(df, path, kind: str):
    """Refuse a table of ``kind`` (merge_eval, mixture, similarity, pretrained) that cannot be used.

    Checks: the required columns; a non-empty, unique key (``subset``, or ``target`` for
    ``pretrained``); ``size`` equal to the number of datasets in ``subset``; accuracies numeric and
    in [0, 1] (a merge_eval table's ``test_acc`` may be empty on rows scored on part of the val
    split, ``val_examples`` below its maximum, and with ``merge_eval.test: selected`` on rows no
    table reports, but never on the best row on val, whose test accuracy is the reported one);
    similarity scores numeric and finite. Returns the table with its numeric columns as numbers.
    Raises :class:`TableError`.
    """
    import pandas as pd

    from mergemix.subsets import parse_subset

    required = _columns(kind)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise TableError(
            f"{path}: missing column(s) {', '.join(missing)} of a {kind} table (it has: {', '.join(map(str, df.columns))}); "
            f"{_fix(path)}"
        )
    if df.empty:
        raise TableError(f"{path}: the {kind} table has no rows; {_fix(path)}")
    df = df.copy()
    key = "target" if kind == "pretrained" else "subset"

    def where(i) -> str:
        return f"row {i + 2} ({key} {df[key].iloc[i]!r})"  # the CSV line: header is line 1

    keys = df[key]
    bad = [i for i, v in enumerate(keys) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise TableError(f"{path}: column {key!r} row {bad[0] + 2} is empty or not a name; {_fix(path)}")
    rows = kind == "merge_eval_rows" and "val_examples" in df.columns
    dup = keys[df.duplicated([key, "val_examples"] if rows else [key])]
    if len(dup):
        where_dup = " on the same val slice" if rows else ""
        raise TableError(f"{path}: {key} {dup.iloc[0]!r} appears more than once{where_dup}; {_fix(path)}")

    def numeric(col: str):
        values = pd.to_numeric(df[col], errors="coerce")
        wrong = [i for i in range(len(df)) if pd.isna(values.iloc[i]) and not pd.isna(df[col].iloc[i])]
        if wrong:
            raise TableError(
                f"{path}: column {col!r} {where(wrong[0])}: {_show(df[col].iloc[wrong[0]])} is not a number; {_fix(path)}"
            )
        df[col] = values
        return values

    if "size" in required:
        size = numeric("size")
        for i, sid in enumerate(keys):
            n = len(parse_subset(sid))
            if pd.isna(size.iloc[i]) or size.iloc[i] != n:
                raise TableError(
                    f"{path}: column 'size' {where(i)}: {_show(df['size'].iloc[i])}, but the subset has {n} dataset(s); {_fix(path)}"
                )
    partial = pd.Series(False, index=df.index)
    if kind in ("merge_eval", "merge_eval_rows") and "val_examples" in df.columns:
        ve = numeric("val_examples")
        low = [i for i in range(len(df)) if pd.isna(ve.iloc[i]) or ve.iloc[i] < 1 or ve.iloc[i] != int(ve.iloc[i])]
        if low:
            raise TableError(
                f"{path}: column 'val_examples' {where(low[0])}: {_show(df['val_examples'].iloc[low[0]])} is not a count >= 1; "
                f"{_fix(path)}"
            )
        partial = ve < ve.max()
    if kind in ("merge_eval", "merge_eval_rows") and "order" in df.columns:
        numeric("order")
    for col in [c for c in _ACC if c in required]:
        values = numeric(col)
        for i in range(len(df)):
            v = values.iloc[i]
            if pd.isna(v):
                if col == "test_acc" and (partial.iloc[i] or kind in ("merge_eval", "merge_eval_rows")):
                    continue  # scored on a slice of the val split only, or merge_eval.test: selected (see below)
                raise TableError(f"{path}: column {col!r} {where(i)}: no value; {_fix(path)}")
            if not 0.0 <= v <= 1.0:
                raise TableError(f"{path}: column {col!r} {where(i)}: {_show(v)} is outside [0, 1]; {_fix(path)}")
    if kind in ("merge_eval", "merge_eval_rows") and df["test_acc"].isna().any():
        from mergemix.selection import select_best

        best = select_best(df)
        if pd.isna(best["test_acc"]):
            raise TableError(
                f"{path}: the best subset on val, {best['subset']!r}, has no test_acc (every merge-eval job scores its "
                f"best's test split, also with merge_eval.test: selected); {_fix(path)}"
            )
    if kind == "similarity":
        for col in required[2:]:
            values = numeric(col)
            for i in range(len(df)):
                if not math.isfinite(values.iloc[i]):
                    raise TableError(
                        f"{path}: column {col!r} {where(i)}: {_show(values.iloc[i])} is not a finite score; {_fix(path)}"
                    )
    return df


def read_result_table(path, kind: str):
    """Read a result CSV and check it (:func:`check_result_table`); unreadable files are refused too."""
    import pandas as pd

    if not Path(path).is_file():
        raise TableError(f"{path}: no such file; rerun snakemake to build it")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise TableError(
            f"{path}: not a readable CSV table ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {_fix(path)}"
        ) from None
    return check_result_table(df, path, kind)


def check_final(obj, path) -> dict:
    """A final-finetune result JSON: the selected subset and accuracies in [0, 1]."""
    if not isinstance(obj, dict):
        raise TableError(f"{path}: not a final-finetune result (a JSON object); {_fix(path)}")
    for key in ("selected", "test_acc"):
        if key not in obj:
            raise TableError(f"{path}: no {key!r} field; {_fix(path)}")
    for key in ("val_acc", "test_acc", "merged_val_acc", "merged_test_acc"):
        v = obj.get(key)
        if key not in obj or (key.startswith("merged_") and (v is None or (isinstance(v, float) and math.isnan(v)))):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise TableError(f"{path}: {key} is {v!r}, not an accuracy in [0, 1]; {_fix(path)}")
    return obj


def pretrained_test_acc(pre, target: str, path) -> float:
    """The pre-trained model's test accuracy on ``target`` from a ``pretrained.csv`` read with
    :func:`read_result_table` and indexed by target (the base of every logit delta)."""
    if target not in pre.index:
        raise TableError(f"{path}: no row for target {target!r}; delete it and rerun snakemake to rebuild it")
    return float(pre.loc[target, "test_acc"])
