"""The merge-eval engine: evaluate merged models for a range of subsets of candidates.

Each fine-tuned model is read from disk once per job and kept as one row of a matrix
``[N, P]`` on the device; the live model is built once. For a merge method linear in the sum of
the selected rows (``uniform``, ``task_arithmetic``) the engine keeps that sum as a running sum
(:class:`mergemix.merging.RunningSum`): the exhaustive strategy enumerates subsets in Gray-code
order, so each step adds or subtracts one row, and a search strategy's next subset costs the rows
that differ. The merged state ``a * sum + b * theta0`` is written straight into the live
parameters, which are views of one flat buffer (:class:`mergemix.merging.LiveParams`): no
model-sized tensor is allocated per subset. Other methods are merged from scratch per subset.

The merged model is evaluated on the target's val split and, with ``test="all"``, its test split;
``test="selected"`` scores the test split only for the subsets the tables report (the job's best
on val, by the selection rule, and any subsets named), the other rows get an empty ``test_acc``.
Evaluation runs under ``torch.inference_mode`` with the split preloaded on the device, in the
batch size and precision of :meth:`mergemix.backends.base.Backend.configure_eval`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch

from mergemix import io, merging, subsets
from mergemix.backends.base import Backend
from mergemix.data.prepared import PreparedDataset

if TYPE_CHECKING:  # pandas is imported lazily: it costs every short job ~0.3 s
    import pandas as pd

log = logging.getLogger("mergemix.merge_eval")
# order: evaluation index within the target's search (exhaustive: the position in the Gray-code
# enumeration, subsets.gray_chunk); val_examples: val examples the row's val_acc used; test_acc is
# empty on rows scored on a val slice, and with merge_eval.test: selected on rows no table reports
COLUMNS = ["subset", "size", "val_acc", "test_acc", "order", "val_examples"]
TEST_MODES = ("all", "selected")


PROGRESS_SECONDS = 30.0  # a job-log line at least this often (tail -f answers "how long still")


class MergeEvaluator:
    """``incremental=False`` merges every subset from scratch (the reference path, for benchmarks);
    ``reanchor_every``: incremental row operations after which the running sum is rebuilt (None:
    :class:`mergemix.merging.RunningSum`'s default for its dtype)."""

    def __init__(
        self,
        backend: Backend,
        pretrained_path,
        model_paths: Mapping[str, str],
        method: str = "uniform",
        options=None,
        incremental: bool = True,
        reanchor_every: int | None = None,
    ):
        self.backend = backend
        self.names = sorted(model_paths)
        self.model = backend.load_pretrained(pretrained_path)
        saved = backend.merge_params(self.model)  # the tensors a fine-tuned model file holds
        # the tensors merged and written: the same, except where a backend merges another form of
        # them (LoRA's dense updates scaling * B @ A instead of the factors, causal_lm)
        live = backend.merge_space_params(self.model)
        self.keys = list(live)
        self.params = [live[k] for k in self.keys]
        self.segments = [p.numel() for p in self.params]  # tensor sizes in the flat vector (scope: tensor)
        self.theta0 = merging.flatten_state(live, self.keys).to(backend.device)
        from mergemix import provenance

        pre = provenance.pretrained_manifest(pretrained_path, backend)
        rows, first = [], {}
        for name in self.names:  # each model derives from this pre-trained model and backend, and is `name`'s
            state, manifest = io.load_model(model_paths[name])
            provenance.check_model(
                manifest,
                state,
                path=model_paths[name],
                expected_datasets=[name],
                pretrained=pre,
                backend=backend,
                reference=saved,
                pretrained_path=pretrained_path,
            )
            first = first or {model_paths[name]: manifest}
            provenance.check_same_hyperparameters({**first, model_paths[name]: manifest})
            rows.append(merging.flatten_state(backend.to_merge_space(state), self.keys))
        self.thetas = torch.stack(rows).to(backend.device)
        del rows
        self.method = method
        merging.get_merge_method(method)  # fail early on an unknown method
        self.incremental, self.reanchor_every = incremental, reanchor_every
        self.running = None
        self.live = merging.LiveParams(self.params, backend.device)
        self.set_options(options)

    def set_options(self, options) -> None:
        """Merge with these options from now on (``merge_eval.tune`` scores one setting after
        another on the same loaded models); the running sum is kept, only its coefficients change."""
        self.options = dict(options or {})
        self.linear = self.incremental and merging.linear_coefficients(self.method, 1, **self.options) is not None
        if self.linear and self.running is None:
            self.running = merging.RunningSum(self.thetas, self.reanchor_every)
        self.mask = None  # the subset whose merged state the live model holds (none: options changed)

    def merged_vector(self, mask: int) -> torch.Tensor:
        """The merged state of ``mask`` computed from scratch (a new ``[P]`` tensor)."""
        idx = [i for i in range(len(self.names)) if mask >> i & 1]
        return merging.merge(
            self.method, self.thetas[idx], self.theta0, segments=self.segments, rows=idx, **self.options
        )

    @torch.no_grad()
    def weighted_vector(self, weights) -> torch.Tensor:
        """The weighted average ``sum_i w_i theta_i`` of all candidates for mixture weights on the
        simplex (``merge_eval.strategy: weights``; a new ``[P]`` tensor)."""
        w = torch.as_tensor(list(weights), dtype=self.thetas.dtype, device=self.thetas.device)
        if w.shape != (len(self.names),) or bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be {len(self.names)} numbers >= 0 summing to 1, got {list(weights)}")
        return w @ self.thetas

    def evaluate_weights(self, target: PreparedDataset, weights, split: str = "val") -> float:
        """Accuracy on ``split`` of the weighted average of the candidates (see :meth:`weighted_vector`)."""
        self.live.write(self.weighted_vector(weights))
        self.mask = None
        with self.backend.eval_context():
            return self.backend.evaluate(self.model, target, split)

    def _coefficients(self, mask: int):
        """``(a, b)`` of the running-sum path for ``mask`` (merged = a * sum + b * theta0), or None
        when the merge is computed from scratch (no running sum, or a method not linear for these options)."""
        if not self.linear:
            return None
        return merging.linear_coefficients(self.method, bin(mask).count("1"), **self.options)

    @torch.no_grad()
    def load_subset(self, mask: int) -> None:
        """Write ``mask``'s merged state into the live model, in place."""
        if not 0 < mask < 1 << len(self.names):
            raise ValueError(f"subset mask {mask} is outside 1..{(1 << len(self.names)) - 1}")
        coeffs = self._coefficients(mask)
        if coeffs is None:  # not linear in the sum (for these options): merged from scratch
            self.live.write(self.merged_vector(mask))
        else:
            self.live.write_linear(self.running.move_to(mask), coeffs[0], coeffs[1], self.theta0)
        self.mask = mask

    @torch.no_grad()
    def merged_states(self, masks: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The merged states of ``masks`` as separate merge-space dicts (for a backend's
        ``evaluate_many``): one new ``[P]`` vector per subset, viewed as the live tensors' shapes."""
        out = []
        for mask in masks:
            coeffs = self._coefficients(mask)
            if coeffs is None:
                vec = self.merged_vector(mask)
            else:
                vec = (self.running.move_to(mask) * coeffs[0]).to(self.theta0.dtype)
                if coeffs[1]:
                    vec.add_(self.theta0, alpha=coeffs[1])
            out.append({key: v.view(p.shape) for key, v, p in zip(self.keys, vec.split(self.segments), self.params)})
        return out

    def evaluate(self, target: PreparedDataset, split: str, mask: int | None = None) -> float:
        """The live model's accuracy on ``split`` (after loading ``mask``, if given)."""
        if mask is not None:
            self.load_subset(mask)  # always written: other code may have changed the live weights
        with self.backend.eval_context():
            return self.backend.evaluate(self.model, target, split)

    def row(self, mask: int, val_acc: float, test_acc: float, order: int, val_examples: int) -> dict:
        names = subsets.mask_to_names(mask, self.names)
        return {
            "subset": subsets.subset_id(names),
            "size": len(names),
            "val_acc": val_acc,
            "test_acc": test_acc,
            "order": order,
            "val_examples": val_examples,
        }

    def run(
        self,
        target: PreparedDataset,
        masks: Sequence[int],
        orders: Sequence[int] | None = None,
        test: str = "all",
        test_masks: Iterable[int] = (),
    ) -> pd.DataFrame:
        """Every subset in ``masks``, in that order, on the whole val split (the exhaustive strategy:
        give the masks of :func:`mergemix.subsets.gray_chunk`, one add or subtract per step).

        ``orders``: the rows' ``order`` values (default ``mask - 1``). ``test="all"`` scores the
        test split of every subset; ``"selected"`` only of ``test_masks`` and of the best subset on
        val by the selection rule (:func:`mergemix.selection.select_best`), so the best over all chunks
        always has its test accuracy."""
        import pandas as pd

        if test not in TEST_MODES:
            raise ValueError(f"merge_eval.test: {test!r} is not allowed; allowed: {', '.join(TEST_MODES)}")
        masks = list(masks)
        orders = [m - 1 for m in masks] if orders is None else list(orders)
        if len(orders) != len(masks):
            raise ValueError(f"{len(orders)} orders for {len(masks)} masks")
        wanted = set(test_masks)
        rows = []
        n_val = len(target.indices["val"])
        k = max(1, int(getattr(self.backend, "merges_per_forward", 1)))
        pairs = list(zip(masks, orders))
        import contextlib

        from mergemix.progress import LogEvery, progress_bar

        every = LogEvery(PROGRESS_SECONDS, first=False)
        with contextlib.ExitStack() as stack:
            bar = progress_bar(stack, len(pairs), 0, "merge-eval", unit="model")
            for start in range(0, len(pairs), k):  # k merged models per forward pass (batched adapters)
                group = pairs[start : start + k]
                rows += self._score_group(target, group, test, wanted, n_val, batched=k > 1)
                done = start + len(group)
                if bar is not None:
                    bar.update(len(group))
                if every.due(done, len(pairs)):
                    rate, eta = every.rate_eta(done, len(pairs))
                    best = max(rows, key=lambda r: r["val_acc"])
                    log.info(
                        "merge-eval: %d/%d merged models (%.1f/s, ETA %.0fs), best val_acc so far %.4f (%s)",
                        done,
                        len(pairs),
                        rate,
                        eta,
                        best["val_acc"],
                        best["subset"],
                    )
        df = pd.DataFrame(rows, columns=COLUMNS)
        if test == "selected" and len(df):
            self.fill_best_test(df, target)
        return df

    def _score_group(self, target: PreparedDataset, group, test: str, wanted, n_val: int, batched: bool) -> list[dict]:
        """Rows of ``group`` ((mask, order) pairs): its one merged model, or (``batched``) all of
        them in one forward pass of a backend that evaluates several merges at once (batched adapters)."""
        if not batched:
            ((mask, order),) = group
            val = self.evaluate(target, "val", mask)
            tst = self.evaluate(target, "test") if test == "all" or mask in wanted else float("nan")
            return [self.row(mask, val, tst, order, n_val)]
        states = self.merged_states([m for m, _ in group])
        with self.backend.eval_context():
            vals = self.backend.evaluate_many(self.model, target, "val", states)
            scored = [i for i, (m, _) in enumerate(group) if test == "all" or m in wanted]
            tests = dict(
                zip(
                    scored,
                    self.backend.evaluate_many(self.model, target, "test", [states[i] for i in scored])
                    if scored
                    else [],
                )
            )
        self.mask = None  # evaluate_many leaves the live weights undefined
        return [self.row(m, v, tests.get(i, float("nan")), o, n_val) for i, ((m, o), v) in enumerate(zip(group, vals))]

    def fill_best_test(self, df: pd.DataFrame, target: PreparedDataset) -> None:
        """Score the test split of ``df``'s best row on val (the selection rule, among rows scored
        on the whole val split) when it has none: a job that knows only its own rows scores its
        local best, and the best over all jobs is one of those."""
        from mergemix.selection import select_best

        best = select_best(df)
        i = df.index[df["subset"] == best["subset"]][0]
        if pd_isna(df.at[i, "test_acc"]):
            mask = subsets.names_to_mask(subsets.parse_subset(best["subset"]), self.names)
            df.at[i, "test_acc"] = self.evaluate(target, "test", mask)

    def scorer(self, target: PreparedDataset, seed: int = 0, test: str = "all"):
        """The scoring callable a search strategy sees: ``(mask, examples) -> (val accuracy, info)``.

        ``examples`` (None: the whole val split) scores on the first ``examples`` of a seeded
        permutation of the val split, so slices are nested and representative. With ``test="all"``
        a full evaluation also scores the test split (``info["test_acc"]``), for the reported
        numbers; a slice does not, nor does any evaluation with ``test="selected"`` (the search
        stage then scores its best subset's test split at the end, :meth:`fill_best_test`).
        The live model moves from subset to subset by the rows that differ (in place).
        """
        import numpy as np

        if test not in TEST_MODES:
            raise ValueError(f"merge_eval.test: {test!r} is not allowed; allowed: {', '.join(TEST_MODES)}")
        val = target.indices["val"]
        perm = val[np.random.default_rng(seed).permutation(len(val))]
        views: dict[int, PreparedDataset] = {}  # one object per slice size: backends cache per object

        def score(mask: int, examples: int | None = None):
            if examples is None or examples >= len(val):
                acc = self.evaluate(target, "val", mask)
                return acc, ({"test_acc": self.evaluate(target, "test")} if test == "all" else {})
            if examples not in views:
                views[examples] = dataclasses.replace(target, indices={**target.indices, "val": perm[:examples]})
            return self.evaluate(views[examples], "val", mask), {}

        return score


def pd_isna(v) -> bool:
    import math

    return v is None or (isinstance(v, float) and math.isnan(v))
