"""Offline stand-ins for the CLIP study: a tiny open_clip architecture with local "pre-trained"
weights, and tiny image datasets in the formats the real loaders read (an image folder, a
``datasets`` dataset saved to disk, parquet files). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY_NAME = "mergemix-tiny-test"
# a 16 px, 2-layer ViT; the text tower keeps open_clip's vocabulary (its tokenizer needs it) but is
# one layer of width 32, so the whole model is ~1.7M parameters
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
IMAGE_SIZE = 16
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_tiny_weights(path: Path, seed: int = 0) -> Path:
    """Register the tiny architecture with open_clip (as a config file) and save random weights."""
    import open_clip
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = path.parent / f"{TINY_NAME}.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_NAME, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


def backend_spec(weights: Path) -> dict:
    return {
        "name": "clip",
        "params": {
            "model": TINY_NAME,
            "model_config": TINY_CONFIG,
            "weights": str(weights),
            "precision": "fp32",
            "eval_batch_size": 32,
        },
    }


def make_images(classes, n_per_class: int, seed: int, style: str = "square"):
    """Colour-coded RGB images of varying, non-square sizes (exercising resize and crop): a class is a
    colour, drawn as a blob (``square``) or as stripes (``stripes``) on a noisy grey background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, c in enumerate(classes):
        for _ in range(n_per_class):
            h, w = int(rng.integers(18, 30)), int(rng.integers(18, 30))
            a = rng.normal(120, 25, (h, w, 3))
            colour = np.array(COLOURS[c], dtype=float) + rng.normal(0, 15, 3)
            if style == "stripes":
                a[::3] = colour
            else:
                y0, x0 = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
                a[y0 : y0 + h // 2, x0 : x0 + w // 2] = colour
            images.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
            labels.append(label)
    return images, labels


def write_image_folder(root: Path, classes, n_train: int, n_test: int, seed: int, style="square") -> Path:
    """``root/{train,test}/<class>/*.png``; class folder names use '_' for spaces."""
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = make_images(classes, n, s, style)
        for i, (im, lab) in enumerate(zip(images, labels)):
            d = Path(root) / split / f"{classes[lab]}_colour"
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:04d}.png")
    return Path(root)


def _hf_split(classes, n, seed, style):
    import datasets

    images, labels = make_images(classes, n, seed, style)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes)), "note": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "note": ["x"] * len(labels)}, features=features
    )


def write_hf_disk(path: Path, classes, n_train: int, n_test: int, seed: int, style="square") -> Path:
    """A ``DatasetDict`` (train, test) written with ``save_to_disk``, with an extra unused column."""
    import datasets

    dd = datasets.DatasetDict(
        {"train": _hf_split(classes, n_train, seed, style), "test": _hf_split(classes, n_test, seed + 1, style)}
    )
    dd.save_to_disk(str(path))
    return Path(path)


def write_hf_parquet(path: Path, classes, n_train: int, n_test: int, seed: int, style="stripes") -> Path:
    """A folder of parquet files named by split, as hub datasets are stored."""
    Path(path).mkdir(parents=True, exist_ok=True)
    _hf_split(classes, n_train, seed, style).to_parquet(str(Path(path) / "train.parquet"))
    _hf_split(classes, n_test, seed + 1, style).to_parquet(str(Path(path) / "test.parquet"))
    return Path(path)
