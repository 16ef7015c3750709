"""The ``smallcnn`` backend's network (its own module: the backend's class is read by the workflow
at every Snakemake start, where importing torch would cost seconds; see mergemix.lazy)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, image_size: int, channels: int, hidden: int, num_classes: int):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        side = image_size // 4
        self.fc = nn.Linear(2 * c * side * side, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
