"""The embedded study's data: scikit-learn's bundled handwritten digits turned into domains.

``load_digits`` ships inside scikit-learn (1,797 real 8x8 images, 10 classes). Each image is
upsampled to 16x16 and a domain transform is applied with per-image random parameters. The base
image index is the split group, so with one study seed a digit image that is in one domain's test
split is in every domain's test split: no target's test image is seen, in any form, by a candidate's
training set.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mergemix.data.registry import RawDataset, register_source

SIZE = 16


def _base_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images.astype(np.float32) / 16.0
    up = ndimage.zoom(imgs, (1, SIZE / 8, SIZE / 8), order=1)
    return np.clip(up, 0.0, 1.0).astype(np.float32), d.target.astype(np.int64)


def _rotate(img, rng, s):
    angle = rng.uniform(25, 45) * s * rng.choice([-1, 1])
    return ndimage.rotate(img, angle, reshape=False, order=1)


def _noise(img, rng, s):
    return img + rng.normal(0.0, 0.6 * s, img.shape)


def _blur(img, rng, s):
    return ndimage.gaussian_filter(img, 1.3 * s) * 1.6


def _shift(img, rng, s):
    dx, dy = rng.uniform(1.0, 2.0 * s, size=2) * rng.choice([-1, 1], size=2)
    return ndimage.shift(img, (dy, dx), order=1)


def _contrast(img, rng, s):
    return 0.55 + (img - 0.55) * (0.3 / s) + rng.normal(0, 0.05, img.shape)


def _thick(img, rng, s):
    return ndimage.grey_dilation(img, size=(1 + int(round(2 * s)),) * 2)


def _thin(img, rng, s):
    return np.clip(img - 0.45 * s, 0, None) * 2.0


def _elastic(img, rng, s):
    alpha, sigma = 6.0 * s, 1.6
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape), sigma) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, img.shape), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return ndimage.map_coordinates(img, [yy + dy, xx + dx], order=1, mode="constant")


def _mirror(img, rng, s):
    return img[:, ::-1]


def _squeeze(img, rng, s):
    f = 1.0 - 0.4 * s
    z = ndimage.zoom(img, (1.0, f), order=1)
    out = np.zeros_like(img)
    off = (SIZE - z.shape[1]) // 2
    out[:, off : off + z.shape[1]] = z
    return out


def _clean(img, rng, s):
    return img


DOMAINS = {
    "clean": _clean,
    "rotate": _rotate,
    "noise": _noise,
    "blur": _blur,
    "shift": _shift,
    "contrast": _contrast,
    "thick": _thick,
    "thin": _thin,
    "elastic": _elastic,
    "mirror": _mirror,
    "squeeze": _squeeze,
}


@register_source("digits", params={"domain": sorted(DOMAINS), "strength": None})
def digits(spec: dict, seed: int, local_dir=None) -> RawDataset:
    domain = spec.get("domain", "clean")
    strength = float(spec.get("strength", 1.0))
    if domain not in DOMAINS:
        raise ValueError(f"unknown digits domain {domain!r}; allowed: {', '.join(sorted(DOMAINS))}")
    if strength <= 0:
        raise ValueError(f"digits strength must be > 0, got {strength}")
    imgs, labels = _base_images()
    rng = np.random.default_rng(seed)
    fn = DOMAINS[domain]
    out = np.stack([fn(im, rng, strength) for im in imgs]).astype(np.float32)
    out = np.clip(out, 0.0, 1.0)[:, None]  # [N, 1, 16, 16]
    return RawDataset(
        x=out,
        y=labels,
        classes=[str(i) for i in range(10)],
        groups=np.arange(len(labels)),
        info={"domain": domain, "strength": strength, "base": "sklearn.load_digits"},
    )
