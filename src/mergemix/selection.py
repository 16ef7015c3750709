"""The selection rule, pure table logic (on pandas tables, with numpy; no models, no torch).

Used by the stages (merge-eval's best of a chunk, the final fine-tune's choice), the analysis, the
method comparison, the weights search and the rankings: one rule everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mergemix import subsets

if TYPE_CHECKING:  # only annotations: importing pandas costs a short job ~0.3 s
    import pandas as pd


def full_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows scored on the whole val split: a search that scores slices (halving) selects among these only."""
    if "val_examples" not in df.columns or df.empty:
        return df
    return df[df["val_examples"] == df["val_examples"].max()]


def select_best(df: pd.DataFrame, column: str = "val_acc", maximize: bool = True) -> pd.Series:
    """The row with the best ``column``; ties go to the smallest subset, then the first name.
    Only rows scored on the whole val split compete (see :func:`full_rows`)."""
    df = full_rows(df).copy()
    df["_key"] = df["subset"].map(subsets.sort_key)
    best = df[column].max() if maximize else df[column].min()
    tied = df[np.isclose(df[column], best, rtol=0, atol=1e-12)]
    return tied.sort_values("_key").iloc[0].drop("_key")
