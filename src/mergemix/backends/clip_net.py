"""The ``clip`` backend's module around open_clip's image encoder (its own module: the backend's
class is read by the workflow at every Snakemake start, where importing torch would cost seconds;
see mergemix.lazy)."""

from __future__ import annotations

import torch
from torch import nn


class ClipImageClassifier(nn.Module):
    """CLIP's image encoder with its input normalisation; takes uint8 images [B, 3, S, S]."""

    def __init__(self, visual: nn.Module, mean, std, image_size: int):
        super().__init__()
        self.visual = visual
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        """Image embeddings (CLIP's projected features, not normalised)."""
        x = (images_u8.float() / 255.0 - self.mean) / self.std
        return self.visual(x)
