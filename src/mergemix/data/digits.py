"""The embedded study's data: scikit-learn's bundled handwritten digits turned into domains.

``load_digits`` ships inside scikit-learn (1,797 real 8x8 images, 10 classes). Each image is
upsampled to 16x16 and a domain transform is applied with per-image random parameters. The base
image index is the split group, so with one study seed a digit image that is in one domain's test
split is in every domain's test split: no target's test image is seen, in any form, by a candidate's
training set.

Spec keys: ``domain`` (one of ``DOMAINS``, or ``mixed``: each image gets one transform drawn from
``mix``), ``strength``, and ``permute`` or ``label_map`` (a fixed relabelling, the same for every
seed), so a domain can look like others while its labels ask something else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mergemix.data.registry import RawDataset, register_source
from mergemix.lazy import LazyModule

ndimage = LazyModule("scipy.ndimage")  # imported by the job that prepares data, not by the Snakefile

SIZE = 16


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits`` returns them (images (1797, 8, 8), targets), read
    from the file it ships without importing scikit-learn (over a second per prepare job)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as f:  # as sklearn.datasets.load_digits reads it
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def _base_images() -> tuple[np.ndarray, np.ndarray]:
    images, target = _load_digits()
    imgs = images.astype(np.float32) / 16.0
    up = ndimage.zoom(imgs, (1, SIZE / 8, SIZE / 8), order=1)
    return np.clip(up, 0.0, 1.0).astype(np.float32), target.astype(np.int64)


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


def _affine(img, matrix):
    """Apply ``out[o] = img[matrix @ (o - c) + c]`` about the image centre (bilinear, zero outside)."""
    c = np.array([(SIZE - 1) / 2.0] * 2)
    return ndimage.affine_transform(img, matrix, offset=c - matrix @ c, order=1, mode="constant")


def _shear(img, rng, s):
    k = rng.uniform(0.35, 0.6) * s * rng.choice([-1, 1])
    return _affine(img, np.array([[1.0, 0.0], [k, 1.0]]))  # rows slide sideways: italic digits


def _zoom(img, f):
    return _affine(img, np.eye(2) / f)  # f > 1 magnifies (the digit's edges leave the frame)


def _zoom_in(img, rng, s):
    return _zoom(img, 1.0 + rng.uniform(0.3, 0.45) * s)


def _zoom_out(img, rng, s):
    return _zoom(img, 1.0 / (1.0 + rng.uniform(0.5, 0.8) * s))


def _occlude(img, rng, s):
    # a seeded block erased somewhere over the digit (the central 12x12)
    h = min(10, max(1, int(round(6 * s))))
    y, x = rng.integers(2, SIZE - 2 - h + 1, size=2)
    out = img.copy()
    out[y : y + h, x : x + h] = 0.0
    return out


def _erode(img, rng, s):
    # morphological erosion (3x3 at s = 1), brightened: strokes lose their ends and thin parts
    return ndimage.grey_erosion(img, size=(1 + int(round(2 * s)),) * 2) * 1.5


def _clutter(img, rng, s):
    # four random straight strokes drawn over the digit (distractor lines)
    out = img.copy()
    for _ in range(max(1, int(round(4 * s)))):
        (y0, x0), (y1, x1) = rng.uniform(0, SIZE - 1, size=(2, 2))
        t = np.linspace(0, 1, 3 * SIZE)
        ys = np.round(y0 + t * (y1 - y0)).astype(int)
        xs = np.round(x0 + t * (x1 - x0)).astype(int)
        out[ys, xs] = np.maximum(out[ys, xs], 0.8)
    return out


def _saltpepper(img, rng, s):
    u = rng.uniform(size=img.shape)
    p = 0.24 * s  # fraction of pixels set to white or black
    return np.where(u < p / 2, 1.0, np.where(u < p, 0.0, img))


def _stripes(img, rng, s):
    # a sinusoidal grating of random orientation and phase added to the background
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    wave = np.sin(2 * np.pi / 4.0 * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    return img + 0.6 * s * (wave + 1.0) / 2.0


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
    "shear": _shear,
    "zoom_in": _zoom_in,
    "zoom_out": _zoom_out,
    "occlude": _occlude,
    "erode": _erode,
    "clutter": _clutter,
    "saltpepper": _saltpepper,
    "stripes": _stripes,
}


def _is_class(c) -> bool:
    """A digit class as a spec may give it: an integer 0-9 (not a bool)."""
    return isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 9


def label_permutation(permute) -> np.ndarray:
    """The relabelling of a ``permute: [a, b, ..., z]`` spec as a map true class -> new label.

    The listed classes are cycled: a digit of class ``a`` is labelled ``b``, ``b`` is labelled the
    next one, ..., and the last listed class ``z`` is labelled ``a``. Unlisted classes keep their
    label. The map is fixed by the spec alone (the same for every seed).
    """
    perm = np.arange(10)
    if permute is None:
        return perm
    if isinstance(permute, (str, bytes)) or not hasattr(permute, "__iter__"):
        raise ValueError(f"digits permute must be a list of classes 0-9, got {permute!r}")
    cyc = list(permute)
    if len(cyc) < 2 or len(set(cyc)) != len(cyc) or not all(map(_is_class, cyc)):
        raise ValueError(f"digits permute must list 2 to 10 distinct classes 0-9, got {permute!r}")
    for a, b in zip(cyc, cyc[1:] + cyc[:1]):
        perm[a] = b
    return perm


def label_mapping(spec: dict) -> np.ndarray:
    """A digits spec's map true class -> label: ``permute`` (a cycle, :func:`label_permutation`),
    or ``label_map``, a list of ten labels 0-9 (``label_map[d]`` is the label of digit ``d``; it
    need not be a permutation: ``[0, 1, 0, 1, ...]`` labels each digit by its parity), or neither
    (true labels). Fixed by the spec alone (the same for every seed)."""
    if spec.get("label_map") is None:
        return label_permutation(spec.get("permute"))
    if spec.get("permute") is not None:
        raise ValueError("digits: give `permute` or `label_map`, not both")
    m = spec["label_map"]
    labels = [] if isinstance(m, (str, bytes, dict)) or not hasattr(m, "__iter__") else list(m)
    if len(labels) != 10 or not all(map(_is_class, labels)):
        raise ValueError(f"digits label_map must list ten labels 0-9 (the label of digit 0, 1, ..., 9), got {m!r}")
    return np.asarray(labels, dtype=np.int64)


def _mix_spec(mix) -> dict[str, float]:
    """``mix`` of a ``domain: mixed`` spec: a list of domains, or a mapping domain -> strength."""
    if isinstance(mix, dict):
        items = dict(mix)
    elif isinstance(mix, (list, tuple)):
        items = {name: 1.0 for name in mix}
    else:
        raise ValueError(f"digits mix must be a list of domains or a mapping domain -> strength, got {mix!r}")
    bad = [n for n in items if n not in DOMAINS]
    if not items or bad:
        raise ValueError(f"digits mix: unknown or no domains {bad}; allowed: {', '.join(sorted(DOMAINS))}")
    out = {}
    for name, st in items.items():
        st = float(st)
        if st <= 0:
            raise ValueError(f"digits mix: strength of {name} must be > 0, got {st}")
        out[name] = st
    return out


MIXED = "mixed"  # domain whose images each get one transform drawn from the spec's `mix`


@register_source(
    "digits",
    params={"domain": sorted([*DOMAINS, MIXED]), "strength": None, "permute": None, "label_map": None, "mix": None},
)
def digits(spec: dict, seed: int, local_dir=None) -> RawDataset:
    """Spec keys: ``domain`` (a transform of ``DOMAINS``, or ``mixed``), ``strength`` (scales the
    transform, default 1), ``mix`` (for ``mixed`` only: the domains drawn from, uniformly per image,
    as a list or a mapping domain -> strength), and ``permute`` (classes whose labels are cycled,
    see :func:`label_permutation`) or ``label_map`` (each digit's label, see :func:`label_mapping`)."""
    domain = spec.get("domain", "clean")
    strength = float(spec.get("strength", 1.0))
    if domain not in DOMAINS and domain != MIXED:
        raise ValueError(f"unknown digits domain {domain!r}; allowed: {', '.join(sorted([*DOMAINS, MIXED]))}")
    if strength <= 0:
        raise ValueError(f"digits strength must be > 0, got {strength}")
    if (domain == MIXED) != ("mix" in spec):
        raise ValueError("digits: `mix` is required with domain: mixed and allowed only there")
    perm = label_mapping(spec)
    imgs, labels = _base_images()
    rng = np.random.default_rng(seed)
    info = {"domain": domain, "strength": strength, "base": "sklearn.load_digits"}
    if domain == MIXED:
        mix = _mix_spec(spec["mix"])
        names = list(mix)
        pick = rng.integers(len(names), size=len(imgs))  # which transform each image gets
        out = np.stack([DOMAINS[names[k]](im, rng, mix[names[k]] * strength) for im, k in zip(imgs, pick)])
        info["mix"] = mix
    else:
        fn = DOMAINS[domain]
        out = np.stack([fn(im, rng, strength) for im in imgs])
    out = np.clip(out.astype(np.float32), 0.0, 1.0)[:, None]  # [N, 1, 16, 16]
    if spec.get("permute") is not None or spec.get("label_map") is not None:
        info["label_map"] = perm.tolist()  # true class -> label used by this dataset
    return RawDataset(
        x=out,
        y=perm[labels],
        classes=[str(i) for i in range(10)],
        groups=np.arange(len(labels)),
        info=info,
    )
