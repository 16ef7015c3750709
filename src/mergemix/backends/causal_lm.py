"""``causal_lm``: a causal language model with an IA3 (or LoRA) adapter, the paper's language study.

* The base model and its tokenizer come from a hub id or a local folder (default
  ``meta-llama/Meta-Llama-3-8B-Instruct``). ``fetch_pretrained`` (a local rule, the only step
  that downloads) puts them in ``models/pretrained/base/`` and saves the freshly initialised
  adapter as theta_0; every other job loads the base from that folder with the hubs offline.
* Only the adapter is fine-tuned, saved (safetensors) and merged (``adapter: none``: the full
  weights, see the last point). A job loads the base model once;
  merge-eval writes each merged adapter into the one live model. What is merged (the merge space,
  :meth:`CausalLMBackend.merge_space_params` and ``to_merge_space``):

  - IA3: the scaling vectors themselves. peft initialises them to ones, so theta_0 is all ones and
    a task vector is ``l_i - 1``: uniform/weighted averages and task arithmetic act on the vectors
    (the uniform average equals peft's ``add_weighted_adapter``), TIES/DARE trim, elect signs and
    drop on the entries of ``l_i - 1``.
  - LoRA, ``lora_merge: products`` (the default): each adapted layer's dense update
    ``dW_i = scaling * B_i @ A_i`` (``out x in``, float32). Merging the factors is not merging
    their products (``mean(B_i) @ mean(A_i) != mean(B_i @ A_i)``), so the merged model is exactly
    ``W0 + merge(dW_1..dW_n)`` in every adapted layer: uniform/weighted/task arithmetic give exactly
    the mean (weighted sum) of the updates; TIES/DARE trim, elect signs and drop on the entries of
    the dense updates (theta_0's update is zero: peft initialises B to zero). The live model of a
    merge-eval job is put in merge space: each LoRA layer gets a ``mergemix_delta`` buffer and
    computes ``W0 x + dW x``; fine-tuning and the saved files keep the factors (small, unchanged).
    Cost: ``out x in`` floats per adapted layer per model, in the engine's ``[N, P]`` matrix and
    per merged model that ``evaluate_many`` stacks (Llama-3-8B with LoRA on q_proj and v_proj:
    about 0.67 G floats, 2.7 GB, per model, against 3.4 M floats for its rank-8 factors), and one
    ``out x in`` matmul per adapted layer and token.
  - LoRA, ``lora_merge: factors``: A and B are merged separately (as this backend did before, and
    as peft's ``add_weighted_adapter`` with ``combination_type="linear"``). Cheap (the factors'
    size) but inexact: the merged update is ``scaling * merge(B_i) @ merge(A_i)``, not a merge of
    the updates.
* Training examples are chats rendered with the tokenizer's chat template; the loss covers the
  assistant turns only (their content and end-of-turn tokens), averaged over those tokens of the
  whole batch (gradient accumulation over micro-batches gives the same gradient as one batch).
* Targets are benchmark groups (``mergemix.data.text``): batched greedy generation with left
  padding and a generation-length limit per benchmark, each benchmark's metric, and their mean.
  This score is what the ``val_acc``/``test_acc`` columns hold in a language study.
* ``evaluate_many`` scores up to ``merges_per_forward`` (8) merged adapters in one batched
  generation: each batch of prompts is repeated K times along the batch and every adapted layer
  applies the k-th merged adapter to the k-th copy (IA3: the k-th scaling vector; LoRA: the k-th
  dense update ``dW_k x``, or ``B_k A_k x`` from merged factors), so the frozen base weights are
  read once for K merged models. The scores are those of ``evaluate`` on each merged state. lm-eval targets,
  and adapters this path does not cover (DoRA, LoRA bias, several active adapters), are scored one
  state at a time.
* Embeddings (appendix A.4): the mean of the last hidden layer over tokens that are neither
  special nor padding, over the full sample (assistant turns included).
* ``adapter: none``: full weights, no adapter. Every floating parameter of the base model is
  fine-tuned (the same training loop), saved and merged by its transformers name
  (``model.layers.0.self_attn.q_proj.weight``...); theta_0 is the base model's weights, saved by
  ``fetch_pretrained`` in mergemix's safetensors format (in the dtype the base folder stores).
  This is how given full fine-tunes (``models:`` with ``format: causal_lm_hf``) are merged. The
  merge engine holds every fine-tuned model in its ``[N, P]`` matrix (N full models in memory,
  plus theta_0 and the live model), and ``evaluate_many`` scores one merged model at a time
  (``merges_per_forward`` 1): this mode is for small models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mergemix.backends.base import Backend, register_backend
from mergemix.backends.training import fit
from mergemix.data.prepared import PreparedDataset
from mergemix.lazy import LazyModule, no_grad
from mergemix.settings import HParams

torch = LazyModule("torch")  # imported by the first job that uses it, not by the Snakefile (mergemix.lazy)

log = logging.getLogger("mergemix.causal_lm")
IGNORE = -100


def set_offline() -> None:
    """Every job after fetch_pretrained/download_data reads local files only."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


# ---------------------------------------------------------------------------------------------
# tokenisation with an assistant-only loss mask
# ---------------------------------------------------------------------------------------------
def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if tokenizer.chat_template is None:
        raise ValueError(
            "the tokenizer has no chat template; use an instruction-tuned model (e.g. *-Instruct) or set "
            "tokenizer.chat_template in the local model folder"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns.

    A turn's span runs from the end of the prompt that asks for it (the chat up to it, rendered
    with the generation prompt) to the end of the chat including it, so it covers the turn's
    content and its end-of-turn marker, and none of the template's header tokens.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise ValueError(
                "the chat template does not render a chat as a prefix of its continuation (it rewrites earlier "
                "turns), so assistant tokens cannot be located; use a template without per-turn rewriting"
            )
        spans.append((len(prefix), len(upto)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its labels (the ids on assistant tokens, -100 elsewhere)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tok if inside else IGNORE)
    return ids[:max_length], labels[:max_length]


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    return ids


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, left: bool, labels: Sequence[Sequence[int]] | None = None):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long) if labels is not None else None
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
        if lab is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    return ids, mask, lab


def _rel_or_abs(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())


class StackedAdapters:
    """Within the block, every adapted linear layer of ``model`` applies K adapters at once.

    ``states`` are K adapter states with the keys of ``live``: ``merge_params`` (saved states) or
    ``merge_space_params`` (merged states; for LoRA with ``lora_merge: products``, one dense
    update per layer). The batch of each forward pass must be K equal slices along dim 0 (copy k
    in rows ``k*b .. (k+1)*b - 1``); the layer applies state k to slice k, computing what the
    layer's own forward computes with state k loaded:

    * IA3: the input (feed-forward modules) or the output of the frozen layer times the k-th vector;
    * LoRA factors: the frozen layer's output plus ``scaling * B_k A_k x`` (two batched matmuls);
    * LoRA dense updates: the frozen layer's output plus ``dW_k x`` (``dW_k`` includes the scaling;
      one ``out x in`` matmul per copy, the updates are not copied into one stacked tensor).

    Only the layers' ``forward`` is replaced (an instance attribute; on exit the previous one is
    back: peft's own, or the merge-space forward of :meth:`CausalLMBackend.merge_space_params`):
    the live adapter's parameters, requires_grad flags and peft's state are not touched.
    """

    def __init__(
        self, model, live: dict[str, torch.nn.Parameter], states: Sequence[dict[str, torch.Tensor]], backend=""
    ):
        why = self.unsupported(model, live)
        if why:
            raise ValueError(f"cannot stack these adapters: {why}")
        for i, st in enumerate(states):
            missing, extra = set(live) - set(st), set(st) - set(live)
            if missing or extra:
                raise ValueError(
                    f"merged state {i} does not fit backend {backend!r}: missing {sorted(missing)[:5]}, unexpected "
                    f"{sorted(extra)[:5]}; was it trained with another backend configuration?"
                )
            wrong = next((n for n, p in live.items() if tuple(st[n].shape) != tuple(p.shape)), None)
            if wrong is not None:
                raise ValueError(
                    f"merged state {i} does not fit backend {backend!r}: tensor {wrong!r} has shape "
                    f"{list(st[wrong].shape)}, the model's has {list(live[wrong].shape)}"
                )
        self.k = len(states)

        def stack(name):  # [K, *shape] on the parameter's device, in its dtype (as load_state writes it)
            p = live[name]
            return torch.stack([st[name].detach().to(p.device, p.dtype) for st in states])

        self.layers = []
        for mname, layer in self._layers(model):
            if hasattr(layer, "ia3_l"):
                vec = stack(f"{mname}.ia3_l.default").flatten(1)  # [K, features], as peft's ia3_l.flatten()
                fwd = self._ia3_forward(layer, vec)
            elif f"{mname}.{DELTA}" in live:
                p = live[f"{mname}.{DELTA}"]
                deltas = [st[f"{mname}.{DELTA}"].detach().to(p.device, p.dtype) for st in states]  # K x [out, in]
                fwd = self._dense_forward(layer, deltas)
            else:
                a = stack(f"{mname}.lora_A.default.weight")  # [K, r, in]
                b = stack(f"{mname}.lora_B.default.weight")  # [K, out, r]
                fwd = self._lora_forward(layer, a.transpose(1, 2), b.transpose(1, 2), layer.scaling["default"])
            self.layers.append((layer, fwd))

    @staticmethod
    def _layers(model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]

    @classmethod
    def unsupported(cls, model, live: dict[str, torch.nn.Parameter]) -> str | None:
        """Why the adapters of ``model`` cannot be stacked (None: they can)."""
        try:
            from peft.tuners.ia3.layer import Linear as IA3Linear
            from peft.tuners.lora.layer import Linear as LoraLinear
        except ImportError as e:  # pragma: no cover - peft is a dependency of the backend
            return f"peft layer classes not importable ({e})"
        covered = set()
        layers = cls._layers(model)
        if not layers:
            return "no adapter layers"
        for name, m in layers:
            if type(m) not in (IA3Linear, LoraLinear):
                return f"{name} is a {type(m).__name__}, not a linear IA3 or LoRA layer"
            if list(m.active_adapters) != ["default"] or m.merged or m.disable_adapters:
                return f"{name}: adapters other than one unmerged, enabled 'default'"
            if ("forward" in vars(m) and not _is_merge_forward(vars(m)["forward"])) or hasattr(m, "_hf_hook"):
                return f"{name}: its forward is already wrapped"
            if type(m) is IA3Linear:
                covered.add(f"{name}.ia3_l.default")
                continue
            if m.lora_variant.get("default") is not None or m.lora_B["default"].bias is not None:
                return f"{name}: a LoRA variant (DoRA...) or LoRA bias"
            drop = m.lora_dropout["default"]
            inactive = isinstance(drop, torch.nn.Identity) or (
                isinstance(drop, torch.nn.Dropout) and (drop.p == 0 or not drop.training)
            )
            if not inactive:
                return f"{name}: active LoRA dropout"
            if f"{name}.{DELTA}" in live:
                covered.add(f"{name}.{DELTA}")
            else:
                covered |= {f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"}
        if covered != set(live):
            return f"trainable tensors outside the adapter layers: {sorted(set(live) - covered)[:3]}"
        return None

    def _slices(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] % self.k:
            raise RuntimeError(f"a batch of {t.shape[0]} rows is not {self.k} equal copies (one per stacked adapter)")
        return t.reshape(self.k, -1, t.shape[-1])

    def _ia3_forward(self, layer, vec: torch.Tensor):
        base, ff = layer.base_layer, layer.is_feedforward

        def forward(x, *args, **kwargs):  # peft's ia3.Linear.forward with adapter k on slice k
            if ff:
                prev = x.dtype
                xs = x.to(vec.dtype)
                interm = (self._slices(xs) * vec[:, None, :]).reshape(xs.shape).to(prev)
                return base(interm, *args, **kwargs)
            result = base(x, *args, **kwargs)
            return (self._slices(result) * vec[:, None, :]).reshape(result.shape).to(result.dtype)

        return forward

    def _lora_forward(self, layer, a_t: torch.Tensor, b_t: torch.Tensor, scaling: float):
        base = layer.base_layer

        def forward(x, *args, **kwargs):  # peft's lora.Linear.forward with adapter k on slice k
            result = base(x, *args, **kwargs)
            xs = layer._cast_input_dtype(x, a_t.dtype)
            delta = torch.bmm(torch.bmm(self._slices(xs), a_t), b_t) * scaling
            return (result + delta.reshape(result.shape)).to(result.dtype)

        return forward

    def _dense_forward(self, layer, deltas: list[torch.Tensor]):
        base = layer.base_layer

        def forward(x, *args, **kwargs):  # the merge-space forward (_merge_forward) with update k on slice k
            result = base(x, *args, **kwargs)
            xs = self._slices(layer._cast_input_dtype(x, deltas[0].dtype))
            delta = torch.stack([torch.nn.functional.linear(xs[k], d) for k, d in enumerate(deltas)])
            return (result + delta.reshape(result.shape)).to(result.dtype)

        return forward

    def __enter__(self):
        # the instance forward each layer had (None: peft's own), put back on exit
        self.previous = [vars(layer).get("forward") for layer, _ in self.layers]
        try:
            for layer, fwd in self.layers:
                layer.forward = fwd
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for (layer, _), prev in zip(self.layers, self.previous):
            if prev is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = prev
        return False


# ---------------------------------------------------------------------------------------------
# LoRA merged as its dense updates (lora_merge: products)
# ---------------------------------------------------------------------------------------------
DELTA = "mergemix_delta"  # buffer of a LoRA layer in merge space: its dense update scaling * B @ A
LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"


def _is_merge_forward(fn) -> bool:
    return bool(getattr(fn, "_mergemix_merge_space", False))


def _merge_forward(layer):
    """A LoRA layer's forward in merge space: ``W0 x + dW x`` with ``dW`` its ``mergemix_delta``
    buffer (read at every call: the merge engine rebinds the buffer's data), as peft's forward of
    one vanilla LoRA adapter with ``scaling * B @ A`` replaced by ``dW``."""
    base = layer.base_layer

    def forward(x, *args, **kwargs):
        result = base(x, *args, **kwargs)
        d = layer._buffers[DELTA]
        xs = layer._cast_input_dtype(x, d.dtype)
        return (result + torch.nn.functional.linear(xs, d)).to(result.dtype)

    forward._mergemix_merge_space = True
    return forward


LORA_MERGES = ("products", "factors")
ADAPTERS = ("ia3", "lora", "none")  # none: full weights (every floating parameter is merged)


@register_backend
class CausalLMBackend(Backend):
    name = "causal_lm"
    can_pretrain = False
    needs_gpu = True
    merges_per_forward = 8  # merged adapters scored per batched generation (evaluate_many)
    merge_only_params = ("eval_batch_size", "lora_merge")
    defaults = {
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",  # hub id or local folder
        "revision": None,
        "adapter": "ia3",  # ia3 | lora | none (full weights: small models only)
        "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],  # ia3 only: scale the input of these modules
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_merge": "products",  # lora only: products (exact merge of scaling*B@A, dense) | factors (cheap, inexact)
        "init_seed": 0,  # lora's random init
        "max_length": 6000,  # context length of training examples (tokens)
        "precision": "auto",  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
        "micro_batch_size": 1,  # examples per forward pass; finetune.batch_size / this = accumulation steps
        "gradient_checkpointing": False,
        "eval_batch_size": 8,
        "embed_batch_size": 8,
        "embed_max_length": 6000,
        "embed_training_data": "full",  # full (appendix A.4) | split (analysis.similarity_split)
        "device_map": None,  # None: one device; "auto": shard over all visible GPUs (accelerate)
    }

    @classmethod
    def check_params(cls, params: dict) -> list[str]:
        problems = super().check_params(params)
        if params.get("adapter") not in ADAPTERS:
            problems.append(
                f"backend.params.adapter: {params.get('adapter')!r} is not allowed for backend {cls.name!r}; "
                f"allowed: {', '.join(ADAPTERS)} (none: full weights, every parameter merged; small models only)"
            )
        if params.get("lora_merge") not in LORA_MERGES:
            problems.append(
                f"backend.params.lora_merge: {params.get('lora_merge')!r} is not allowed for backend {cls.name!r}; "
                f"allowed: {', '.join(LORA_MERGES)} (products: the exact merge of the updates scaling*B@A; factors: "
                "A and B merged separately, cheap but not a merge of the updates)"
            )
        return problems

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.params
        if p["adapter"] == "none":
            self.merges_per_forward = 1  # full models are not stacked: evaluate_many scores one at a time
        if p["embed_training_data"] not in ("full", "split"):
            raise ValueError("backend causal_lm: embed_training_data must be 'full' or 'split'")
        self.tokenizer = None
        self._encoded: dict = {}

    # --- model ---------------------------------------------------------------------------------
    def dtype(self) -> torch.dtype:
        prec = self.params["precision"]
        if prec == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if prec not in table:
            raise ValueError(f"backend causal_lm: precision {prec!r} not allowed; allowed: auto, {', '.join(table)}")
        return table[prec]

    def full_weights(self) -> bool:
        """``adapter: none``: the base model's own weights are fine-tuned and merged."""
        return self.params["adapter"] == "none"

    def peft_config(self):
        from peft import IA3Config, LoraConfig, TaskType

        p = self.params
        if self.full_weights():
            raise ValueError("backend causal_lm with adapter: none has no peft adapter")
        if p["adapter"] == "ia3":
            ff = [m for m in p["feedforward_modules"] if m in p["target_modules"]]
            return IA3Config(
                task_type=TaskType.CAUSAL_LM, target_modules=list(p["target_modules"]), feedforward_modules=ff
            )
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=list(p["target_modules"]),
            r=int(p["lora_r"]),
            lora_alpha=int(p["lora_alpha"]),
            lora_dropout=0.0,
        )

    def attach_adapter(self, base):
        if self.full_weights():
            for p in base.parameters():
                p.requires_grad_(p.is_floating_point())
            return base
        from peft import get_peft_model

        torch.manual_seed(int(self.params["init_seed"]))
        model = get_peft_model(base, self.peft_config())
        return model

    def fetch_pretrained(self, out_path) -> dict:
        """Put the base model and tokenizer in a local folder and save the initial adapter (theta_0;
        ``adapter: none``: the base model's weights)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from mergemix import __version__, io

        out_path = Path(out_path)
        src = Path(str(self.params["model"])).expanduser()
        if src.is_dir():
            base_dir, origin = src.resolve(), {"local": str(src.resolve())}
        else:
            from huggingface_hub import HfApi, snapshot_download

            repo, rev = str(self.params["model"]), self.params["revision"]
            base_dir = out_path.parent / "base"
            # resolve the revision first, so the files and the recorded commit are the same snapshot
            commit = HfApi().model_info(repo, revision=rev).sha
            snapshot_download(
                repo_id=repo,
                revision=commit,
                local_dir=str(base_dir),
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
            origin = {"hub": repo, "revision": rev, "resolved_revision": commit}
        tok = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        render(tok, [{"role": "user", "content": "hi"}])  # fail here, not in a GPU job, without a chat template
        if self.full_weights():  # theta_0 is the base model's weights, as the folder stores them
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto", local_files_only=True)
            model = self.attach_adapter(model)
        else:  # the adapter's shapes need only the architecture: build the base on the meta device
            cfg = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
            with torch.device("meta"):
                base = AutoModelForCausalLM.from_config(cfg)
            model = self.attach_adapter(base)
            self._materialize_adapter(model)
        state = {k: v.detach().cpu() for k, v in self.merge_params(model).items()}
        n = int(sum(v.numel() for v in state.values()))
        manifest = {
            "kind": "pretrained",
            "backend": self.describe(),
            "base_model": _rel_or_abs(base_dir, out_path.parent),
            "origin": origin,
            ("merge_parameters" if self.full_weights() else "adapter_parameters"): n,
            "mergemix_version": __version__,
        }
        log.info(
            "base model in %s; %s with %d parameters", base_dir, "full weights" if self.full_weights() else "adapter", n
        )
        return io.save_model(out_path, state, manifest)

    def _materialize_adapter(self, model) -> None:
        """Give the adapter of a meta-device model real (CPU) tensors with peft's initialisation."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        torch.manual_seed(int(self.params["init_seed"]))
        for m in model.modules():
            if not isinstance(m, BaseTunerLayer):
                continue
            for name in m.adapter_layer_names:
                getattr(m, name).to_empty(device="cpu")
            if hasattr(m, "reset_ia3_parameters"):
                m.reset_ia3_parameters("default")
            else:
                m.reset_lora_parameters("default", True)

    def load_pretrained(self, path):
        """Base model from the local folder (never the network), the adapter attached, theta_0 loaded."""
        set_offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergemix import io

        state, manifest = io.load_model(path)
        base_dir = Path(path).parent / manifest["base_model"]
        if not base_dir.is_dir():
            raise FileNotFoundError(
                f"base model folder {base_dir} (from {io.manifest_path(path)}) is missing; rerun fetch_pretrained "
                "(delete the pretrained model files first)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs = {"dtype": self.dtype(), "local_files_only": True}
        device_map = self.params["device_map"]
        if device_map is None and self.device.type == "cuda" and torch.cuda.device_count() > 1:
            device_map = "auto"
        if device_map:
            kwargs["device_map"] = device_map
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
        if not device_map:
            base = base.to(self.device)
        if self.params["gradient_checkpointing"]:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        model = self.attach_adapter(base)
        self.load_state(model, state)
        model.eval()
        return model

    def merge_params(self, model) -> dict[str, torch.nn.Parameter]:
        """The adapter's parameters (the only trainable ones), by their stable names; ``adapter:
        none``: every floating parameter of the model (tied weights once, by their first name)."""
        if self.full_weights():
            return {k: p for k, p in model.named_parameters() if p.is_floating_point()}
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("the model has no trainable adapter parameters; was the adapter attached?")
        return params

    # --- merge space ---------------------------------------------------------------------------
    def merges_products(self) -> bool:
        """Whether LoRA adapters are merged as their dense updates (``lora_merge: products``)."""
        return self.params["adapter"] == "lora" and self.params["lora_merge"] == "products"

    def lora_scaling(self) -> float:
        return float(self.params["lora_alpha"]) / float(self.params["lora_r"])

    def to_merge_space(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved adapter state in merge space. IA3 and ``lora_merge: factors``: as is. LoRA
        products: each layer's factors become ``{layer}.mergemix_delta = scaling * B @ A`` (float32,
        ``out x in``, on the state's device); the pre-trained adapter gives zeros (B is zero)."""
        if not self.merges_products():
            return state
        scaling, out = self.lora_scaling(), {}
        for k, v in state.items():
            if k.endswith(LORA_B):
                if k[: -len(LORA_B)] + LORA_A not in state:
                    raise ValueError(f"LoRA state has {k!r} but not its A factor {k[: -len(LORA_B)] + LORA_A!r}")
                continue
            if not k.endswith(LORA_A):
                out[k] = v  # not a LoRA factor: merged as is
                continue
            name = k[: -len(LORA_A)]
            b = state.get(name + LORA_B)
            if b is None:
                raise ValueError(f"LoRA state has {k!r} but not its B factor {name + LORA_B!r}")
            out[f"{name}.{DELTA}"] = (b.detach().float() @ v.detach().float()) * scaling
        return out

    def merge_space_params(self, model) -> dict[str, torch.Tensor]:
        """The live tensors merged states are written into. IA3 and ``lora_merge: factors``:
        :meth:`merge_params`. LoRA products: the first call puts ``model`` in merge space (each
        LoRA layer gets a float32 ``mergemix_delta`` buffer holding ``scaling * B @ A`` of its
        current factors, zeros for the pre-trained adapter, and a forward computing ``W0 x + dW x``
        from it), later calls return the same buffers. Fine-tuning is refused in merge space;
        :meth:`load_state` of a saved state also sets the updates from its factors;
        :meth:`leave_merge_space` restores peft's forward."""
        if not self.merges_products():
            return self.merge_params(model)
        self._enter_merge_space(model)
        out = {}
        for k, p in self.merge_params(model).items():
            if k.endswith(LORA_A):
                name = k[: -len(LORA_A)]
                out[f"{name}.{DELTA}"] = model.get_submodule(name)._buffers[DELTA]
            elif not k.endswith(LORA_B):
                out[k] = p
        return out

    @staticmethod
    def in_merge_space(model) -> bool:
        return any(DELTA in m._buffers for m in model.modules())

    def _lora_layers(self, model):
        from peft.tuners.lora.layer import LoraLayer

        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

    def _enter_merge_space(self, model) -> None:
        from peft.tuners.lora.layer import Linear as LoraLinear

        layers = self._lora_layers(model)
        if not layers:
            raise ValueError("lora_merge: products needs a model with LoRA layers; was the adapter attached?")
        todo = []
        for name, m in layers:
            if DELTA in m._buffers and _is_merge_forward(vars(m).get("forward")):
                continue
            why = None
            if type(m) is not LoraLinear:
                why = f"it is a {type(m).__name__}, not a linear LoRA layer"
            elif (
                list(m.active_adapters) != ["default"]
                or list(m.lora_A) != ["default"]
                or m.merged
                or m.disable_adapters
            ):
                why = "adapters other than one unmerged, enabled 'default'"
            elif m.lora_variant.get("default") is not None or m.lora_B["default"].bias is not None:
                why = "a LoRA variant (DoRA...) or LoRA bias"
            elif not isinstance(m.lora_dropout["default"], torch.nn.Identity) and m.lora_dropout["default"].p:
                why = "LoRA dropout"
            elif "forward" in vars(m) or hasattr(m, "_hf_hook"):
                why = "its forward is already wrapped"
            elif abs(float(m.scaling["default"]) - self.lora_scaling()) > 1e-12:
                why = f"its scaling {m.scaling['default']} is not lora_alpha / lora_r = {self.lora_scaling()}"
            if why:
                raise ValueError(
                    f"lora_merge: products cannot put LoRA layer {name} in merge space: {why}; use lora_merge: factors"
                )
            todo.append(m)
        with torch.no_grad(), torch.inference_mode(False):
            for m in todo:
                m.register_buffer(DELTA, self._product(m), persistent=False)
                m.forward = _merge_forward(m)

    def _product(self, layer) -> torch.Tensor:
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        return (b.detach().float() @ a.detach().float().to(b.device)) * self.lora_scaling()

    def leave_merge_space(self, model) -> None:
        """peft's own forward (from the factors) again; the dense updates are dropped."""
        for _, m in self._lora_layers(model):
            if _is_merge_forward(vars(m).get("forward")):
                vars(m).pop("forward")
            m._buffers.pop(DELTA, None)

    def load_state(self, model, state, params=None) -> None:
        """Write a saved state into the adapter (``params``: other live tensors, see the base
        class). A model in merge space also gets the dense updates of the loaded factors."""
        super().load_state(model, state, params)
        if params is None and self.merges_products() and self.in_merge_space(model):
            with torch.no_grad():
                for _, m in self._lora_layers(model):
                    if DELTA in m._buffers:
                        m._buffers[DELTA].copy_(self._product(m))

    def _input_device(self, model) -> torch.device:
        return model.get_input_embeddings().weight.device

    # --- data ----------------------------------------------------------------------------------
    @staticmethod
    def _chat_of(record: dict) -> list[dict]:
        """The full sample as a chat: a training chat, or a benchmark prompt with its first reference."""
        if "messages" in record:
            return record["messages"]
        if "prompt" in record:
            msgs = [{"role": "system", "content": record["system"]}] if record.get("system") else []
            return msgs + [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["references"][0]},
            ]
        raise ValueError(f"record with keys {sorted(record)} is neither a chat nor a benchmark example")

    def _encode(self, data: PreparedDataset, split: str):
        def build():
            recs, _ = data.split(split)
            for r in recs[:1]:
                if "messages" not in r:
                    raise ValueError(
                        f"dataset {data.name!r} is not chat training data (records have keys {sorted(r)}); "
                        "a target (benchmarks, lm_eval) cannot be a fine-tuning candidate"
                    )
            enc = [encode_chat(self.tokenizer, r["messages"], int(self.params["max_length"])) for r in recs]
            n_empty = sum(1 for _, lab in enc if all(l == IGNORE for l in lab))
            if n_empty:
                log.warning(
                    "%s/%s: %d of %d examples have no assistant token within max_length=%s",
                    data.name,
                    split,
                    n_empty,
                    len(enc),
                    self.params["max_length"],
                )
            return enc

        return self.cached(self._encoded, data, (split, "train"), build)

    def _token_loss_sum(self, model, examples) -> tuple[torch.Tensor, int]:
        ids, mask, labels = pad_batch(
            [e[0] for e in examples], self.tokenizer.pad_token_id, False, [e[1] for e in examples]
        )
        dev = self._input_device(model)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        labels = labels.to(logits.device)
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        return loss, int((shift_labels != IGNORE).sum())

    # --- training ------------------------------------------------------------------------------
    def finetune(self, model, data: Sequence[PreparedDataset], hp: HParams | Mapping) -> dict:
        if self.in_merge_space(model):
            raise RuntimeError(
                "the model is in merge space (its LoRA layers use merged dense updates, not the "
                "factors); call leave_merge_space(model) before fine-tuning it"
            )
        examples = [e for d in data for e in self._encode(d, "train")]
        n_label = [sum(1 for l in lab[1:] if l != IGNORE) for _, lab in examples]
        micro = max(1, int(self.params["micro_batch_size"]))
        params = list(self.merge_params(model).values())
        model.train()

        def step_loss(idx):
            idx = idx.tolist()
            total = max(1, sum(n_label[i] for i in idx))  # assistant tokens of the whole batch
            done = 0.0
            for s in range(0, len(idx), micro):
                chunk = [examples[i] for i in idx[s : s + micro]]
                loss_sum, _ = self._token_loss_sum(model, chunk)
                (loss_sum / total).backward()
                done += loss_sum.item() / total
            return done

        name = "finetune " + "+".join(d.name for d in data)
        groups = [(d.name, len(self._encode(d, "train"))) for d in data]
        metrics = fit(params, len(examples), step_loss, hp, log_name=name, backward_done=True, groups=groups)
        model.eval()
        metrics["val_loss"] = self.mean_loss(model, [e for d in data for e in self._encode(d, "val")])
        metrics["n_train"] = len(examples)
        metrics["n_train_tokens"] = int(sum(len(e[0]) for e in examples))
        return metrics

    @no_grad
    def mean_loss(self, model, examples) -> float:
        if not examples:
            return float("nan")
        tot, n = 0.0, 0
        bs = max(1, int(self.params["micro_batch_size"]))
        for s in range(0, len(examples), bs):
            loss, k = self._token_loss_sum(model, examples[s : s + bs])
            tot, n = tot + loss.item(), n + k
        return tot / max(1, n)

    # --- evaluation ----------------------------------------------------------------------------
    @no_grad
    def generate(self, model, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        """Greedy completions of chat prompts, batched with left padding."""
        return self._generate(model, prompts, max_new_tokens, copies=1)[0]

    @no_grad
    def _generate(self, model, prompts: list[list[dict]], max_new_tokens: int, copies: int) -> list[list[str]]:
        """Completions per copy: each batch of prompts is repeated ``copies`` times along the batch
        (copy k in rows ``k*b .. (k+1)*b - 1``), which :class:`StackedAdapters` gives adapter k."""
        tok = self.tokenizer
        enc = [tok(render(tok, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))  # similar lengths share a batch
        out: list[list[str]] = [[""] * len(enc) for _ in range(copies)]
        bs = self.eval_batch_size(int(self.params["eval_batch_size"]))  # merge_eval.eval_batch_size overrides
        dev = self._input_device(model)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            ids, mask, _ = pad_batch([enc[i] for i in idx], tok.pad_token_id, left=True)
            if copies > 1:
                ids, mask = ids.repeat(copies, 1), mask.repeat(copies, 1)
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            for k in range(copies):
                for j, i in enumerate(idx):
                    out[k][i] = tok.decode(gen[k * len(idx) + j, ids.shape[1] :], skip_special_tokens=True).strip()
        return out

    def benchmark_scores(self, model, data: PreparedDataset, split: str) -> dict[str, float]:
        return self._benchmark_scores(model, data, split, copies=1)[0]

    def _benchmark_scores(self, model, data: PreparedDataset, split: str, copies: int) -> list[dict[str, float]]:
        from mergemix.text_metrics import score

        recs, _ = data.split(split)
        if not recs:
            raise ValueError(f"target {data.name!r} has no {split} examples")
        if "prompt" not in recs[0]:
            raise ValueError(
                f"dataset {data.name!r} is not a benchmark target (records have keys {sorted(recs[0])}); "
                "targets of a causal_lm study use the 'benchmarks' or 'lm_eval' source"
            )
        by_bench: dict[str, list] = {}
        for r in recs:
            by_bench.setdefault(r["benchmark"], []).append(r)
        scores: list[dict[str, float]] = [{} for _ in range(copies)]
        model.eval()
        for name in sorted(by_bench):
            rs = by_bench[name]
            prompts = [self._chat_of(r)[:-1] for r in rs]
            preds = self._generate(model, prompts, rs[0]["max_new_tokens"], copies)
            for k in range(copies):
                scores[k][name] = score(rs[0]["metric"], preds[k], [r["references"] for r in rs])
        return scores

    def evaluate(self, model, data: PreparedDataset, split: str) -> float:
        recs, _ = data.split(split)
        if recs and recs[0].get("lm_eval"):
            from mergemix.lm_eval_adapter import evaluate_lm_eval

            return evaluate_lm_eval(self, model, recs[0])
        scores = self.benchmark_scores(model, data, split)
        log.info("%s/%s: %s", data.name, split, {k: round(v, 4) for k, v in scores.items()})
        return float(np.mean(list(scores.values())))

    def evaluate_many(
        self, model, data: PreparedDataset, split: str, states: Sequence[dict[str, torch.Tensor]]
    ) -> list[float]:
        """``evaluate`` of each merged adapter state, ``merges_per_forward`` of them per batched
        generation (see :class:`StackedAdapters`); the live adapter's values are left as they were.

        The states are saved states (the keys of ``merge_params``) or, all of them, merge-space
        states (the keys of ``merge_space_params``: for LoRA products, dense updates; such states
        put the model in merge space)."""
        states = list(states)
        recs, _ = data.split(split)
        k = max(1, int(self.merges_per_forward))
        if len(states) < 2 or k < 2 or (recs and recs[0].get("lm_eval")):
            return super().evaluate_many(model, data, split, states)
        dense = self.merges_products() and any(key.endswith("." + DELTA) for key in states[0])
        live = self.merge_space_params(model) if dense else self.merge_params(model)
        why = StackedAdapters.unsupported(model, live)
        if why:
            log.info("evaluate_many: scoring merged adapters one at a time (%s)", why)
            return super().evaluate_many(model, data, split, states)
        out: list[float] = []
        for s in range(0, len(states), k):
            chunk = states[s : s + k]
            with StackedAdapters(model, live, chunk, backend=self.name):
                per = self._benchmark_scores(model, data, split, copies=len(chunk))
            for scores in per:
                log.info("%s/%s: %s", data.name, split, {n: round(v, 4) for n, v in scores.items()})
                out.append(float(np.mean(list(scores.values()))))
        return out

    # --- embeddings ----------------------------------------------------------------------------
    @no_grad
    def embed(self, model, data: PreparedDataset, split: str) -> np.ndarray:
        """Mean last-layer hidden state over non-special, non-padding tokens, one row per sample.

        Training (chat) datasets are embedded in full with ``embed_training_data: full`` (appendix
        A.4); targets use ``split`` (the workflow's ``analysis.similarity_split``, val by default).
        """
        every = np.unique(np.concatenate([np.asarray(v, dtype=np.int64) for v in data.indices.values()]))
        recs = [data.x[i] for i in every]  # every sample of the prepared dataset, all splits
        if not (recs and "messages" in recs[0] and self.params["embed_training_data"] == "full"):
            recs, _ = data.split(split)
        if recs and recs[0].get("lm_eval"):
            from mergemix.lm_eval_adapter import lm_eval_examples

            recs = lm_eval_examples(recs[0])  # the split's documents, as prompt + reference
        tok = self.tokenizer
        skip = torch.tensor(sorted(special_ids(tok)), dtype=torch.long)
        maxlen = int(self.params["embed_max_length"])
        enc = [tok(render(tok, self._chat_of(r)), add_special_tokens=False)["input_ids"][:maxlen] for r in recs]
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        out = np.zeros((len(enc), model.config.hidden_size), dtype=np.float32)
        bs = max(1, int(self.params["embed_batch_size"]))
        dev = self._input_device(model)
        model.eval()
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            ids, mask, _ = pad_batch([enc[i] for i in idx], tok.pad_token_id, left=False)
            keep = mask.bool() & ~torch.isin(ids, skip)
            h = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True).hidden_states[-1]
            keep = keep.to(h.device).unsqueeze(-1).float()
            mean = (h.float() * keep).sum(1) / keep.sum(1).clamp_min(1.0)
            out[idx] = mean.cpu().numpy()
        return out
