"""The merge-eval engine: evaluate merged models for a range of subsets of candidates.

Each fine-tuned model is read from disk once per job and kept as one row of a matrix
``[N, P]``; for every subset the merged vector is computed from those rows and written into a
single live model (no model construction or file reads per subset), which is then evaluated on
the target's val and test splits.
"""

from __future__ import annotations

import dataclasses
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
# order: evaluation index within the target's search; val_examples: val examples the row's val_acc used
COLUMNS = ["subset", "size", "val_acc", "test_acc", "order", "val_examples"]


class MergeEvaluator:
    def __init__(self, backend: Backend, pretrained_path, model_paths: Mapping[str, str], method: str = "uniform", options=None):
        self.backend = backend
        self.names = sorted(model_paths)
        self.model = backend.load_pretrained(pretrained_path)
        live = backend.merge_params(self.model)
        self.keys = list(live)
        self.params = [live[k] for k in self.keys]
        self.theta0 = merging.flatten_state(live, self.keys).to(backend.device)
        from mergemix import provenance

        pre = provenance.pretrained_manifest(pretrained_path, backend)
        rows, first = [], {}
        for name in self.names:  # each model derives from this pre-trained model and backend, and is `name`'s
            state, manifest = io.load_model(model_paths[name])
            provenance.check_model(manifest, state, path=model_paths[name], expected_datasets=[name], pretrained=pre,
                                   backend=backend, reference=live, pretrained_path=pretrained_path)
            first = first or {model_paths[name]: manifest}
            provenance.check_same_hyperparameters({**first, model_paths[name]: manifest})
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

    def row(self, mask: int, val_acc: float, test_acc: float, order: int, val_examples: int) -> dict:
        names = subsets.mask_to_names(mask, self.names)
        return {
            "subset": subsets.subset_id(names), "size": len(names), "val_acc": val_acc, "test_acc": test_acc,
            "order": order, "val_examples": val_examples,
        }

    def run(self, target: PreparedDataset, masks: Sequence[int]) -> pd.DataFrame:
        """Every subset in ``masks`` on the whole val and test splits (the exhaustive strategy)."""
        import pandas as pd

        rows = []
        t0 = time.time()
        n_val = len(target.indices["val"])
        for i, mask in enumerate(masks):
            self.load_subset(mask)
            val = self.backend.evaluate(self.model, target, "val")
            rows.append(self.row(mask, val, self.backend.evaluate(self.model, target, "test"), mask - 1, n_val))
            if (i + 1) % 50 == 0:
                log.info("%d/%d merged models evaluated (%.1fs)", i + 1, len(masks), time.time() - t0)
        return pd.DataFrame(rows, columns=COLUMNS)

    def scorer(self, target: PreparedDataset, seed: int = 0):
        """The scoring callable a search strategy sees: ``(mask, examples) -> (val accuracy, info)``.

        ``examples`` (None: the whole val split) scores on the first ``examples`` of a seeded
        permutation of the val split, so slices are nested and representative. A full evaluation
        also scores the test split (``info["test_acc"]``), for the reported numbers; a slice does not.
        """
        import numpy as np

        val = target.indices["val"]
        perm = val[np.random.default_rng(seed).permutation(len(val))]
        views: dict[int, PreparedDataset] = {}  # one object per slice size: backends cache per object

        def score(mask: int, examples: int | None = None):
            self.load_subset(mask)
            if examples is None or examples >= len(val):
                acc = self.backend.evaluate(self.model, target, "val")
                return acc, {"test_acc": self.backend.evaluate(self.model, target, "test")}
            if examples not in views:
                views[examples] = dataclasses.replace(target, indices={**target.indices, "val": perm[:examples]})
            return self.backend.evaluate(self.model, views[examples], "val"), {}

        return score
