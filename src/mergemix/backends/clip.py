"""``clip``: the image encoder of a pre-trained CLIP model with frozen zero-shot heads (open_clip).

The paper's vision study (section 4.1): CLIP ViT-B-32 with OpenAI's weights, one zero-shot
classification head per dataset, and only the image encoder fine-tuned and merged, as in the
task-vectors line of work.

* ``fetch_pretrained`` (a local rule, the only step that may download weights) builds the model
  from an open_clip pretrained tag or a local checkpoint file and saves the *full* CLIP state
  (the text tower is needed once more, for the heads) with the preprocessing it expects.
* ``write_head`` (the ``zeroshot_head`` rule, one job per dataset) encodes every prompt template
  for every class, L2-normalises, averages over templates, normalises again and multiplies by the
  model's ``exp(logit_scale)``; the ``[classes, dim]`` matrix is saved once as a file in
  ``<pretrained dir>/heads/<dataset>.safetensors`` and never trained or merged.
* ``load_pretrained`` builds the architecture with ``pretrained=None`` and loads the saved file:
  no job after ``fetch_pretrained`` touches the network. It keeps only the image encoder.
* Fine-tuning updates the image encoder only. On a mixture each sample is classified by its own
  dataset's head (multi-head training). bf16 autocast on GPU (``precision``), fp32 master weights.
* Inputs are the prepared uint8 ``[N, 3, S, S]`` images (decoded and resized once, at prepare
  time); a split used for evaluation is cut from the memory-mapped array once per job and kept as
  a tensor on the device, so the 2^N merged evaluations of a merge-eval job only run the encoder.

A custom architecture is registered at run time with ``model_config`` (an open_clip model-config
dict stored under the name ``model``); the tests use a tiny one with local "pre-trained" weights.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from mergemix import io
from mergemix.backends.base import Backend, register_backend
from mergemix.backends.training import fit
from mergemix.data.prepared import PreparedDataset
from mergemix.lazy import LazyModule, no_grad
from mergemix.settings import HParams

torch = LazyModule("torch")  # imported by the first job that uses it, not by the Snakefile (mergemix.lazy)
F = LazyModule("torch.nn.functional")
if TYPE_CHECKING:
    from torch import nn

    from mergemix.backends.clip_net import ClipImageClassifier

log = logging.getLogger("mergemix.clip")


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # the clip extra is optional
        raise ImportError(
            f"backend 'clip' needs open_clip ({e}); install the extra: pip install 'mergemix[clip]'"
        ) from None
    return open_clip


class ImageReader:
    """Reads rows of prepared uint8 image arrays with ``workers`` threads.

    Prepared arrays are memory maps; fancy-indexing one reads the rows one page fault at a time
    while holding the GIL. Here each row is one ``os.pread`` (which releases the GIL) in a thread
    pool, so a batch of 128 images at 147 KiB is read in parallel from a cold page cache or a
    network file system. ``workers: 0`` falls back to plain indexing.
    """

    def __init__(self, workers: int):
        self.workers = int(workers)
        self._pool = None
        self._fds: dict = {}

    def __call__(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        # only a whole memory-mapped file (not a view of one) has its rows at x.offset + i * row_bytes
        direct = isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.flags.c_contiguous
        if self.workers <= 0 or not direct or len(rows) == 0:
            return np.asarray(x[rows])
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers)
        fd = self._fds.get(x.filename)
        if fd is None:
            fd = self._fds[x.filename] = os.open(x.filename, os.O_RDONLY)
        row_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize
        out = np.empty((len(rows), *x.shape[1:]), dtype=x.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)

        def read(j: int) -> None:
            buf = os.pread(fd, row_bytes, x.offset + int(rows[j]) * row_bytes)
            if len(buf) != row_bytes:
                raise OSError(f"short read from {x.filename}: the prepared data is truncated; rerun prepare_data")
            flat[j] = np.frombuffer(buf, dtype=np.uint8)

        list(self._pool.map(read, range(len(rows))))
        return out


def zeroshot_weights(
    clip_model, tokenizer, classnames: Sequence[str], templates: Sequence[str], device
) -> torch.Tensor:
    """The zero-shot head ``[classes, dim]``: per class, encode every template, normalise, average,
    normalise again; scale by ``exp(logit_scale)``. Logits are ``normalize(image_emb) @ head.T``."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            tokens = tokenizer([t.replace("{}", name) for t in templates]).to(device)
            emb = clip_model.encode_text(tokens).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            rows.append(mean / mean.norm())
        return torch.stack(rows) * clip_model.logit_scale.exp().float()


@register_backend
class ClipBackend(Backend):
    name = "clip"
    can_pretrain = False
    needs_gpu = True
    has_heads = True  # the workflow adds a zeroshot_head rule and makes heads inputs of the model rules
    defaults = {
        # open_clip architecture: ViT-B/32 with QuickGELU, the activation OpenAI's weights were trained
        # with (open_clip's plain "ViT-B-32" uses GELU and would silently change the model)
        "model": "ViT-B-32-quickgelu",
        "pretrained": "openai",  # open_clip pretrained tag (used by fetch_pretrained only)
        "weights": None,  # a local checkpoint file used instead of the tag (no download)
        "model_config": None,  # an open_clip model-config dict, registered under `model` at run time
        "cache_dir": None,  # open_clip's download cache (fetch_pretrained only)
        "precision": "bf16",  # autocast on GPU: bf16 or fp32 (CPU always runs fp32)
        "eval_batch_size": 512,
        "workers": 4,  # threads reading image batches from the prepared arrays
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.params["precision"] not in ("bf16", "fp32"):
            raise ValueError(
                f"backend 'clip': precision {self.params['precision']!r} is not allowed; allowed: bf16, fp32"
            )
        self._heads: dict = {}
        self._tensors: dict = {}
        self._heads_dir: Path | None = None
        self._pretrained_sha: str | None = None
        self._read = ImageReader(int(self.params["workers"]))

    # --- building ---------------------------------------------------------------------------------
    def _register_config(self, open_clip) -> None:
        cfg = self.params["model_config"]
        name = self.params["model"]
        if cfg is None:
            if open_clip.get_model_config(name) is None:
                raise ValueError(
                    f"backend 'clip': open_clip has no architecture {name!r}; use one of open_clip.list_models() "
                    "or give model_config (an open_clip model-config dict) to register it"
                )
            return
        existing = open_clip.get_model_config(name)
        if existing == cfg:
            return
        if existing is not None:
            raise ValueError(
                f"backend 'clip': model_config would replace open_clip's architecture {name!r}; "
                "give the custom architecture another name"
            )
        import json
        import tempfile

        # open_clip's public registration takes a JSON file named after the architecture
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)
        if open_clip.get_model_config(name) != cfg:
            raise ValueError(
                f"backend 'clip': model_config for {name!r} was not accepted by open_clip; it needs embed_dim, "
                "vision_cfg and text_cfg (see open_clip/model_configs/*.json)"
            )

    def _check_activation(self) -> None:
        """Refuse a tag whose weights were trained with another activation than the architecture's."""
        open_clip = _open_clip()
        self._register_config(open_clip)
        name, tag = self.params["model"], self.params["pretrained"]
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not tag_cfg:
            raise ValueError(
                f"backend 'clip': open_clip has no pretrained tag {tag!r} for {name!r}; available: "
                f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'} (or give weights: <file>)"
            )
        want, have = (
            bool(tag_cfg.get("quick_gelu", False)),
            bool(open_clip.get_model_config(name).get("quick_gelu", False)),
        )
        if want != have:
            fix = f"{name}-quickgelu" if want else name.replace("-quickgelu", "")
            raise ValueError(
                f"backend 'clip': the {tag!r} weights were trained with{'' if want else 'out'} QuickGELU but "
                f"architecture {name!r} uses {'GELU' if want else 'QuickGELU'}; set model: {fix}"
            )

    def _build(self, pretrained=None, **kw):
        open_clip = _open_clip()
        self._register_config(open_clip)
        if pretrained is not None:
            return open_clip.create_model(self.params["model"], pretrained=pretrained, device="cpu", **kw)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; our weights are loaded next
        try:
            return open_clip.create_model(self.params["model"], pretrained=None, device="cpu", **kw)
        finally:
            logging.disable(logging.NOTSET)

    def fetch_pretrained(self, out_path) -> dict:
        """Build the model with published weights (tag) or a local checkpoint, save it in mergemix's format."""
        weights = self.params["weights"]
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"backend 'clip': weights file {weights} does not exist")
            source, sha = str(Path(weights).resolve()), io.sha256_file(weights)
        else:
            source, sha = self.params["pretrained"], None
            self._check_activation()
        model = self._build(source, cache_dir=self.params["cache_dir"], require_pretrained=True)
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        open_clip = _open_clip()
        manifest = {
            "kind": "pretrained",
            "backend": self.describe(),
            "source": source,
            "source_sha256": sha,
            "open_clip_version": getattr(open_clip, "__version__", None),
            "preprocess": {
                "mean": list(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                "std": list(pp.get("std", open_clip.OPENAI_DATASET_STD)),
                "image_size": _side(model.visual.image_size),
                # what the image sources implement (mergemix.data.images.to_model_input)
                "interpolation": pp.get("interpolation", "bicubic"),
                "resize_mode": pp.get("resize_mode", "shortest"),
            },
        }
        log.info("pre-trained %s from %s", self.params["model"], source)
        return io.save_model(out_path, model.state_dict(), manifest)

    def _load_full(self, path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing after fetch_pretrained may download
        state, manifest = io.load_model(path)
        model = self._build(None)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{path} does not fit architecture {self.params['model']!r} ({str(e)[:300]}); the backend params "
                "changed since fetch_pretrained ran: rerun it"
            ) from None
        self._heads_dir = Path(path).parent / "heads"  # heads are a function of the pre-trained model
        self._pretrained_sha = manifest["sha256"]
        return model.eval(), manifest

    def load_pretrained(self, path) -> ClipImageClassifier:
        clip_model, manifest = self._load_full(path)
        pp = manifest["preprocess"]
        persistent = set(clip_model.visual.state_dict()) - {k for k, _ in clip_model.visual.named_parameters()}
        if persistent:
            raise ValueError(
                f"backend 'clip': the image encoder of {self.params['model']} has buffers {sorted(persistent)[:3]} "
                "(e.g. batch norm) that merging would not carry; use a ViT architecture"
            )
        from mergemix.backends.clip_net import ClipImageClassifier

        model = ClipImageClassifier(clip_model.visual, pp["mean"], pp["std"], pp["image_size"])
        del clip_model  # the text tower is needed only by write_head
        return model.to(self.device).eval()

    def merge_params(self, model: ClipImageClassifier) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())  # "visual.*": the image encoder only

    # --- zero-shot heads --------------------------------------------------------------------------
    def write_head(self, pretrained, data: PreparedDataset, out_path, templates=None) -> dict:
        """Compute a dataset's zero-shot head from its class names and templates and save it.

        ``templates``: a built-in set name or a list; default: the dataset spec's ``templates``."""
        from mergemix.data.clip_datasets import resolve_templates

        open_clip = _open_clip()
        clip_model, pre = self._load_full(pretrained)
        # the head job runs right after prepare: refuse images of the wrong size before any GPU job
        self._check_size(int(pre["preprocess"]["image_size"]), data)
        how = (pre["preprocess"].get("interpolation", "bicubic"), pre["preprocess"].get("resize_mode", "shortest"))
        if how != ("bicubic", "shortest"):
            log.warning(
                "%s expects %s resizing (%s); the image sources resize the shorter side (bicubic) and centre-crop",
                self.params["model"],
                how[0],
                how[1],
            )
        clip_model = clip_model.to(self.device)
        templates = resolve_templates(templates if templates is not None else (data.spec or {}).get("templates"))
        tokenizer = open_clip.get_tokenizer(self.params["model"])
        weight = zeroshot_weights(clip_model, tokenizer, data.classes, templates, self.device)  # fp32: computed once
        manifest = {
            "kind": "zeroshot_head",
            "dataset": data.name,
            "classnames": list(data.classes),
            "templates": templates,
            "pretrained_sha256": self._pretrained_sha,
            "logit_scale": float(clip_model.logit_scale.detach().exp()),
            "backend": self.describe(),
        }
        return io.save_model(out_path, {"weight": weight.float()}, manifest)

    def head_path(self, dataset: str) -> Path:
        if self._heads_dir is None:
            raise RuntimeError("load the pre-trained model first: heads live beside it")
        return self._heads_dir / f"{dataset}.safetensors"

    def _head(self, data: PreparedDataset) -> torch.Tensor:
        if data.name not in self._heads:
            path = self.head_path(data.name)
            if not path.exists():
                raise FileNotFoundError(
                    f"no zero-shot head for dataset {data.name!r} at {path}; the workflow's zeroshot_head rule writes "
                    f"it (by hand: mergemix head --backend ... --pretrained ... --data {data.path} --out {path})"
                )
            state, manifest = io.load_model(path)
            if manifest["classnames"] != list(data.classes) or manifest["pretrained_sha256"] != self._pretrained_sha:
                raise ValueError(
                    f"zero-shot head {path} was built for other class names or another pre-trained model; "
                    "delete it and rerun the zeroshot_head rule"
                )
            self._heads[data.name] = state["weight"].to(self.device, torch.float32)
        return self._heads[data.name]

    # --- running the encoder ----------------------------------------------------------------------
    def _autocast(self, evaluating: bool = False):
        if evaluating and self.eval_precision != "auto":
            return contextlib.nullcontext()  # merge_eval.precision applies (Backend.eval_context)
        if self.device.type == "cuda" and self.params["precision"] == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logits(self, model, images_u8, head, evaluating: bool = False) -> torch.Tensor:
        with self._autocast(evaluating):
            emb = model(images_u8)
        emb = emb.float()
        return (emb / emb.norm(dim=-1, keepdim=True)) @ head.T

    def _check_size(self, model_or_size, data: PreparedDataset) -> None:
        size = model_or_size if isinstance(model_or_size, int) else model_or_size.image_size
        if not isinstance(data.x, np.ndarray) or data.x.ndim != 4 or data.x.dtype != np.uint8:
            raise ValueError(f"dataset {data.name!r} is not prepared as uint8 images [N, 3, S, S]; use an image source")
        if data.x.shape[-1] != size or data.x.shape[-2] != size:
            raise ValueError(
                f"dataset {data.name!r} was prepared at {data.x.shape[-1]} px but {self.params['model']} takes "
                f"{size} px; set image_size: {size} in its spec"
            )

    def _split(self, model, data: PreparedDataset, split: str):
        """A split's images as one device tensor, cut from the memory map once per job.

        Only the splits of the dataset used last are kept: a merge-eval job evaluates one target
        many times, while eval-pretrained visits each target once (8 targets' val and test splits
        at 224 px would be 16 GB)."""
        for other in [k for k, (d, _) in self._tensors.items() if d is not data]:
            del self._tensors[other]

        def build():
            self._check_size(model, data)
            idx = data.indices[split]
            x, y = self._read(data.x, idx), data.y[idx]
            return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

        return self.cached(self._tensors, data, split, build)

    @no_grad
    def _count_correct(self, model, data: PreparedDataset, split: str, evaluating: bool = False) -> tuple[int, int]:
        model.eval()
        x, y = self._split(model, data, split)
        head, bs = self._head(data), self.eval_batch_size(int(self.params["eval_batch_size"]))
        correct = torch.zeros((), dtype=torch.long, device=y.device)  # one device sync per split, not per batch
        for s in range(0, len(y), bs):
            correct += (self._logits(model, x[s : s + bs], head, evaluating).argmax(1) == y[s : s + bs]).sum()
        return int(correct), len(y)

    def evaluate(self, model, data, split):
        self._check_size(model, data)  # before the head: a wrong image size is the problem to name
        self._head(data)  # loaded outside inference mode: a later fine-tune in this job may train with it
        with self.eval_context():  # the split is preloaded on the device once per dataset object (_split)
            correct, n = self._count_correct(model, data, split, evaluating=True)
        return correct / max(1, n)

    @no_grad
    def embed(self, model, data, split):
        model.eval()
        x, _ = self._split(model, data, split)
        bs = int(self.params["eval_batch_size"])
        out = []
        for s in range(0, len(x), bs):
            with self._autocast():
                out.append(model(x[s : s + bs]).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)

    # --- fine-tuning ------------------------------------------------------------------------------
    def finetune(self, model, data: Sequence[PreparedDataset], hp: HParams | Mapping) -> dict:
        """Fine-tune the image encoder on the union of the train splits; each sample is scored by
        its own dataset's frozen head. Batches are gathered from the memory-mapped arrays."""
        hp = HParams.coerce(hp, "hparams")
        for d in data:
            self._check_size(model, d)
        heads = [self._head(d) for d in data]
        train = [d.indices["train"] for d in data]
        src = np.concatenate([np.full(len(t), k) for k, t in enumerate(train)])
        loc = np.concatenate(train)
        torch.manual_seed(int(hp.seed))
        model.train()

        def step_loss(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.numpy()
            s, rows = src[idx], loc[idx]
            xs, ys, parts = [], [], []
            for k in np.unique(s):
                r = rows[s == k]
                xs.append(torch.from_numpy(self._read(data[k].x, r)))
                ys.append(torch.from_numpy(data[k].y[r]))
                parts.append((k, len(r)))
            x = torch.cat(xs).to(self.device, non_blocking=True)
            y = torch.cat(ys).to(self.device)
            with self._autocast():
                emb = model(x)
            emb = emb.float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            loss, start = emb.new_zeros(()), 0
            for k, n in parts:
                logits = emb[start : start + n] @ heads[k].T
                loss = loss + F.cross_entropy(logits, y[start : start + n], reduction="sum")
                start += n
            return loss / len(idx)

        metrics = fit(
            model.parameters(),
            len(loc),
            step_loss,
            hp,
            log_name="finetune " + "+".join(d.name for d in data),
            groups=[(d.name, len(t)) for d, t in zip(data, train)],
        )
        model.eval()
        per = {d.name: self._count_correct(model, d, "val") for d in data}
        metrics["val_acc"] = sum(c for c, _ in per.values()) / max(1, sum(n for _, n in per.values()))
        metrics["val_acc_per_dataset"] = {k: c / max(1, n) for k, (c, n) in per.items()}
        metrics["n_train"] = int(len(loc))
        return metrics


def _side(size) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)
