"""``smallcnn``: a small convnet for small images, pre-trained by the pipeline itself.

It is the model of the embedded ``digits`` study. All its parameters are fine-tuned and merged
(it has no normalisation buffers, so a merged state is fully described by its parameters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from mergemix.backends.base import Backend, register_backend
from mergemix.backends.training import fit
from mergemix.data.prepared import PreparedDataset
from mergemix.lazy import LazyModule, no_grad
from mergemix.settings import HParams

torch = LazyModule("torch")  # imported by the first job that uses it, not by the Snakefile (mergemix.lazy)
F = LazyModule("torch.nn.functional")
if TYPE_CHECKING:
    from torch import nn


@register_backend
class SmallCNNBackend(Backend):
    name = "smallcnn"
    can_pretrain = True
    pack_size = 16  # a fine-tune takes about a second: 16 to a job (config `pack`)
    defaults = {"in_channels": 1, "image_size": 16, "channels": 16, "hidden": 64, "num_classes": 10, "init_seed": 0}
    positive_int_params = ("in_channels", "image_size", "channels", "hidden", "num_classes")

    @classmethod
    def check_params(cls, params: dict) -> list[str]:
        problems = super().check_params(params)
        seed = params.get("init_seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            problems.append(f"backend.params.init_seed: {seed!r} is not allowed; give an integer >= 0")
        size = params.get("image_size")
        if isinstance(size, int) and not isinstance(size, bool) and 1 <= size < 4:
            problems.append(f"backend.params.image_size: {size} is too small for two 2x2 poolings; give 4 or more")
        return problems

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tensors: dict = {}

    def create(self) -> nn.Module:
        torch.manual_seed(int(self.params["init_seed"]))
        p = self.params
        from mergemix.backends.smallcnn_net import SmallCNN

        return SmallCNN(p["in_channels"], p["image_size"], p["channels"], p["hidden"], p["num_classes"]).to(self.device)

    def load_pretrained(self, path) -> nn.Module:
        from mergemix import io

        model = self.create()
        state, manifest = io.load_model(path)
        self.load_state(model, state)
        return model

    def merge_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return dict(model.named_parameters())

    # data -------------------------------------------------------------------------------------
    def _split(self, data: PreparedDataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            x, y = data.split(split)
            return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

        return self.cached(self._tensors, data, split, build)

    def _concat(self, data: Sequence[PreparedDataset], split: str):
        xs, ys = zip(*(self._split(d, split) for d in data))
        return torch.cat(xs), torch.cat(ys)

    # training ---------------------------------------------------------------------------------
    def _train(self, model: nn.Module, data: Sequence[PreparedDataset], hp: HParams | Mapping, name: str) -> dict:
        x, y = self._concat(data, "train")
        model.train()

        def step_loss(idx):
            return F.cross_entropy(model(x[idx]), y[idx])

        groups = [(d.name, len(self._split(d, "train")[1])) for d in data]
        metrics = fit(model.parameters(), len(y), step_loss, hp, log_name=name, groups=groups)
        model.eval()
        metrics["train_acc"] = self._accuracy(model, x, y)
        metrics["val_acc"] = self._accuracy(model, *self._concat(data, "val"))
        metrics["n_train"] = int(len(y))
        return metrics

    def pretrain(self, model, data, hp):
        return self._train(model, data, hp, "pretrain")

    def finetune(self, model, data, hp):
        return self._train(model, data, hp, "finetune " + "+".join(d.name for d in data))

    # evaluation -------------------------------------------------------------------------------
    @no_grad
    def _accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 4096) -> float:
        model.eval()
        correct = 0
        for s in range(0, len(y), bs):
            correct += (model(x[s : s + bs]).argmax(1) == y[s : s + bs]).sum().item()
        return correct / max(1, len(y))

    def evaluate(self, model, data, split):
        x, y = self._split(data, split)  # preloaded on the device once per dataset object
        with self.eval_context():
            return self._accuracy(model, x, y, bs=self.eval_batch_size(4096))

    @no_grad
    def embed(self, model, data, split):
        model.eval()
        x, _ = self._split(data, split)
        return model.features(x).cpu().numpy().astype(np.float32)
