"""The backend interface and its registry.

A backend is one model family. The pipeline needs exactly these operations from it:

* ``create()``                    a randomly initialised model (for the ``pretrain`` stage)
* ``pretrain(data, hp)``          train it from scratch (only backends with ``can_pretrain``)
* ``fetch_pretrained(out)``       or: get published weights (hub or local file) and save them in
                                  mergemix's format (only backends without ``can_pretrain``); the
                                  workflow runs this as a local rule, the only step that may download
* ``load_pretrained(path)``       the pre-trained model ``theta_0``, from the file written above
* ``finetune(model, data, hp)``   fine-tune in place on a list of training datasets (a mixture);
                                  ``hp``: :class:`mergemix.settings.HParams` (a mapping: convert it
                                  with ``HParams.coerce``, or hand it to ``training.fit``, which does)
* ``merge_params(model)``         the live tensors that are fine-tuned and saved
* ``merge_space_params(model)``   the live tensors merged values are written into (default: the
                                  same); ``to_merge_space(state)`` turns a saved state into their
                                  keys and shapes (default: as is). A LoRA adapter is merged as its
                                  dense updates ``scaling * B @ A``, not as its factors
* ``evaluate(model, data)``       accuracy on a split of a target dataset
* ``evaluate_many(model, data, split, states)``  the same for several merged states (default: one
                                  by one; adapter backends run ``merges_per_forward`` per forward pass)
* ``embed(model, data)``          one vector per sample, for the similarity baselines

Saved models hold only ``merge_params`` (a full model for a small convnet, the image encoder for
CLIP, the adapter for IA3); loading a fine-tuned model is ``load_pretrained`` plus writing the
saved tensors into those parameters.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mergemix.data.prepared import PreparedDataset
from mergemix.lazy import LazyModule
from mergemix.plugins import GROUPS, PluginError, Registry
from mergemix.settings import HParams

torch = LazyModule("torch")  # imported by the first job that uses it, not by the Snakefile (mergemix.lazy)

EVAL_PRECISIONS = ("auto", "fp32", "bf16")


class Backend:
    name: str = ""
    can_pretrain: bool = False
    needs_gpu: bool = False  # whether the study's heavy rules should request GPUs on a cluster
    # short jobs (fine-tunes, embeddings) run per process by default (config `pack`): many for a
    # backend whose jobs last seconds, where starting Python and importing torch dominate; 1 where a
    # fine-tune lasts minutes
    pack_size: int = 1
    defaults: dict = {}
    # params that change how models are merged or evaluated, never what a job trains: a model made
    # with another value is still this backend's (the provenance checks skip them)
    merge_only_params: tuple = ("eval_batch_size",)
    # params that must be integers >= 1 (sizes of the model), checked with the study config
    positive_int_params: tuple = ()
    # evaluation settings of a merge-eval job (merge_eval.eval_batch_size, merge_eval.precision),
    # set by configure_eval; None / "auto": the backend's own
    eval_batch: int | None = None
    eval_precision: str = "auto"
    # how many merged models ``evaluate_many`` scores per forward pass (1: one at a time)
    merges_per_forward: int = 1

    @classmethod
    def check_params(cls, params: dict) -> list[str]:
        """Problems with the backend params (defaults filled in), one message per bad key with the fix."""
        problems = []
        for k in cls.positive_int_params:
            v = params.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(
                    f"backend.params.{k}: {v!r} is not allowed for backend {cls.name!r}; give an integer >= 1"
                )
        return problems

    def __init__(self, params: dict | None = None, threads: int = 1, device: str | None = None):
        self.params = {**self.defaults, **(params or {})}
        unknown = set(self.params) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"backend {self.name!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(self.defaults))}"
            )
        bad = self.check_params(self.params)
        if bad:
            raise ValueError("; ".join(bad))
        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # --- to implement -------------------------------------------------------------------------
    def create(self) -> torch.nn.Module:
        raise NotImplementedError

    def pretrain(self, model: torch.nn.Module, data: Sequence[PreparedDataset], hp: HParams | Mapping) -> dict:
        raise NotImplementedError(f"backend {self.name!r} loads a pre-trained model; it has no pretrain stage")

    def fetch_pretrained(self, out_path) -> dict:
        raise NotImplementedError(f"backend {self.name!r} is pre-trained by the pipeline; use its pretrain stage")

    def load_pretrained(self, path) -> torch.nn.Module:
        raise NotImplementedError

    def finetune(self, model: torch.nn.Module, data: Sequence[PreparedDataset], hp: HParams | Mapping) -> dict:
        raise NotImplementedError

    def merge_params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def merge_space_params(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The live tensors the merge engine writes merged values into (name -> tensor; the engine
        flattens them in this dict's order). The pre-trained model is this of a freshly loaded
        ``load_pretrained`` model. Default: :meth:`merge_params`; a backend whose saved tensors do
        not merge linearly (LoRA factors) returns other tensors here, e.g. one dense update per
        layer, and may switch the model's forward to use them (see the backend)."""
        return self.merge_params(model)

    def to_merge_space(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved state (the keys of :meth:`merge_params`) in the keys and shapes of
        :meth:`merge_space_params`: one row of the merge engine. Default: ``state`` as is."""
        return state

    def load_merge_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Write a merge-space state (the keys of :meth:`merge_space_params`) into the live model."""
        self.load_state(model, state, params=self.merge_space_params(model))

    def evaluate(self, model: torch.nn.Module, data: PreparedDataset, split: str) -> float:
        raise NotImplementedError

    def embed(self, model: torch.nn.Module, data: PreparedDataset, split: str) -> np.ndarray:
        raise NotImplementedError

    def evaluate_many(
        self, model: torch.nn.Module, data: PreparedDataset, split: str, states: Sequence[dict[str, torch.Tensor]]
    ) -> list[float]:
        """``evaluate`` of each merged state, in order: name -> tensor with the keys of
        ``merge_params`` (a saved state) or of ``merge_space_params`` (a merged one).

        This default writes each state into the live model and evaluates it; a backend that scores
        several merged models in one forward pass overrides it and sets ``merges_per_forward``. The
        live model's merge params are unspecified afterwards: load a state before ``evaluate``."""
        scores = []
        for state in states:
            if set(state) == set(self.merge_params(model)):
                self.load_state(model, state)
            else:
                self.load_merge_state(model, state)
            scores.append(self.evaluate(model, data, split))
        return scores

    # --- shared -------------------------------------------------------------------------------
    def configure_eval(self, batch_size: int | None = None, precision: str = "auto") -> None:
        """How ``evaluate`` runs: examples per forward pass (None: the backend's default) and
        precision (``auto``: the backend's own; ``fp32``: no autocast; ``bf16``: bfloat16 autocast on
        the evaluating device, CPU included). Scores are unchanged by the batch size up to float
        rounding; bf16 may move a near-tie."""
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"merge_eval.eval_batch_size: {batch_size!r} is not allowed; give an integer >= 1 or null")
        if precision not in EVAL_PRECISIONS:
            raise ValueError(
                f"merge_eval.precision: {precision!r} is not allowed; allowed: {', '.join(EVAL_PRECISIONS)}"
            )
        self.eval_batch, self.eval_precision = batch_size, precision

    def eval_batch_size(self, default: int) -> int:
        return max(1, int(self.eval_batch if self.eval_batch is not None else default))

    def eval_context(self):
        """``torch.inference_mode`` plus the evaluation precision (:meth:`configure_eval`)."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.eval_precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        elif self.eval_precision == "fp32":
            stack.enter_context(torch.autocast(self.device.type, enabled=False))
        return stack

    def state_to_save(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.merge_params(model).items()}

    def load_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor], params=None) -> None:
        """Write ``state`` into ``params`` (default: ``merge_params(model)``), checking keys and shapes."""
        params = self.merge_params(model) if params is None else params
        missing = set(params) - set(state)
        extra = set(state) - set(params)
        if missing or extra:
            raise ValueError(
                f"saved state does not fit backend {self.name!r} with params {self.params}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}; was it trained with another "
                "backend configuration? Rerun the fine-tune stages after changing the backend."
            )
        wrong = next((k for k, p in params.items() if tuple(state[k].shape) != tuple(p.shape)), None)
        if wrong is not None:
            raise ValueError(
                f"saved state does not fit backend {self.name!r} with params {self.params}: tensor {wrong!r} has shape "
                f"{list(state[wrong].shape)}, the model's has {list(params[wrong].shape)}; was it trained with another "
                "backend configuration? Rerun the pretrain and fine-tune stages after changing the backend."
            )
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    @staticmethod
    def cached(store: dict, data: PreparedDataset, key, build):
        """``build()`` once per dataset object and ``key`` (a split, say) within a job.

        The entry holds the dataset object itself: a key of ``id(data)`` alone would hand a later
        dataset the cached tensors of an earlier one that was freed and whose id was reused."""
        entry = store.get((id(data), key))
        if entry is None or entry[0] is not data:
            # built as normal tensors even when the first use is inside torch.inference_mode: an
            # inference tensor could not be used by a later training step of the same job
            with torch.inference_mode(False):
                entry = store[(id(data), key)] = (data, build())
        return entry[1]

    def describe(self) -> dict:
        return {"name": self.name, "params": self.params}


# The registry: name -> backend class. The built-ins are imported on the first lookup of their name
# (base.py imports none of the backend modules, which import it to register themselves); other
# packages add backends through the entry-point group "mergemix.backends" (see mergemix.plugins).
BUILTIN_BACKENDS = {
    "smallcnn": "mergemix.backends.smallcnn:SmallCNNBackend",
    "clip": "mergemix.backends.clip:ClipBackend",  # open_clip is imported only when used
    "causal_lm": "mergemix.backends.causal_lm:CausalLMBackend",  # transformers/peft too
}


def _adopt_backend(name: str, obj) -> None:
    """Register a backend class named by an entry point (one that did not register itself)."""
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise PluginError(f"backend {name!r}: {obj!r} is not a subclass of mergemix.backends.base.Backend")
    if obj.name != name:
        raise PluginError(
            f"backend {name!r}: class {obj.__module__}.{obj.__qualname__} has name {obj.name!r}; "
            f"set its class attribute name = {name!r} (the entry point's name)"
        )
    register_backend(obj)


BACKENDS: Registry = Registry("backend", GROUPS["backends"], BUILTIN_BACKENDS, _adopt_backend)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator adding a backend under its ``name`` (a name of the built-ins is refused for
    a class from another module)."""
    if not cls.name:
        raise ValueError("a backend class needs a non-empty name")
    BACKENDS.add(cls.name, cls)
    return cls


def backend_names() -> list[str]:
    """The backends' names (built-ins and plugins), importing none of them."""
    return BACKENDS.names()


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; available: {', '.join(BACKENDS.names())}")
    return BACKENDS[name]


def get_backend(spec: dict, threads: int = 1, device: str | None = None) -> Backend:
    """Instantiate the backend described by ``{"name": ..., "params": {...}}``."""
    return backend_class(spec.get("name"))(spec.get("params", {}), threads=threads, device=device)


def _load_builtin() -> None:
    """Kept for older callers: the backends are imported on the first lookup of their name now."""
