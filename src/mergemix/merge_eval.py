"""The merge-eval engine: evaluate merged models for a range of subsets of candidates.

Each fine-tuned model is read from disk once per job and kept as one row of a matrix
``[N, P]``; for every subset the merged vector is computed from those rows and written into a
single live model (no model construction or file reads per subset), which is then evaluated on
the target's val and test splits.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from mergemix import io, merging, subsets
from mergemix.backends.base import Backend
from mergemix.data.prepared import PreparedDataset


if TYPE_CHECKING:  # pandas is imported lazily: it costs every short job ~0.3 s
    import pandas as pd

log = logging.getLogger("mergemix.merge_eval")
COLUMNS = ["subset", "size", "val_acc", "test_acc"]


class MergeEvaluator:
    def __init__(self, backend: Backend, pretrained_path, model_paths: Mapping[str, str], method: str = "uniform", options=None):
        self.backend = backend
        self.names = sorted(model_paths)
        self.model = backend.load_pretrained(pretrained_path)
        live = backend.merge_params(self.model)
        self.keys = list(live)
        self.params = [live[k] for k in self.keys]
        self.theta0 = merging.flatten_state(live, self.keys).to(backend.device)
        rows = []
        for name in self.names:
            state, manifest = io.load_model(model_paths[name])
            rows.append(merging.flatten_state(state, self.keys))
        self.thetas = torch.stack(rows).to(backend.device)
        self.method = method
        self.options = dict(options or {})
        merging.get_merge_method(method)  # fail early on an unknown method

    def merged_vector(self, mask: int) -> torch.Tensor:
        idx = [i for i in range(len(self.names)) if mask >> i & 1]
        return merging.merge(self.method, self.thetas[idx], self.theta0, **self.options)

    @torch.no_grad()
    def load_subset(self, mask: int) -> None:
        merging.unflatten_into(self.merged_vector(mask), self.params)

    def run(self, target: PreparedDataset, masks: Sequence[int]) -> pd.DataFrame:
        import pandas as pd

        rows = []
        t0 = time.time()
        for i, mask in enumerate(masks):
            self.load_subset(mask)
            names = subsets.mask_to_names(mask, self.names)
            rows.append(
                {
                    "subset": subsets.subset_id(names),
                    "size": len(names),
                    "val_acc": self.backend.evaluate(self.model, target, "val"),
                    "test_acc": self.backend.evaluate(self.model, target, "test"),
                }
            )
            if (i + 1) % 50 == 0:
                log.info("%d/%d merged models evaluated (%.1fs)", i + 1, len(masks), time.time() - t0)
        return pd.DataFrame(rows, columns=COLUMNS)
