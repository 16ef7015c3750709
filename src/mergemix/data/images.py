"""Image-classification sources for the CLIP backend: an image folder, and any Hugging Face dataset.

Both decode every image once, at prepare time, into the model's input geometry: the shorter side
resized to ``image_size`` (bicubic) and the centre cropped to ``image_size`` x ``image_size``,
as open_clip's evaluation transform does, stored as uint8 ``[N, 3, S, S]`` in the prepared
``arrays.safetensors``. Training and the 2^N merged evaluations then only slice that array (memory
mapped); no job decodes or resizes an image again. Disk cost: 3 * S * S bytes per image, 147 KiB
at 224 px.

``hf_images`` has a download step (a local rule): ``datasets.load_dataset(hub_id, revision=...)``
saved with ``save_to_disk``; the source itself reads only that local copy. ``hub_id`` may also be a
local path (a ``save_to_disk`` folder or a folder of parquet files), which is how the tests run the
real loading code offline.

Spec keys shared by both sources:

* ``image_size`` model input resolution (224 for ViT-B-32; must equal the backend's)
* ``classnames`` prompt class names: a built-in set (``mergemix.data.clip_datasets``), a list in
  label order, or ``from_data`` (the label feature's names / the folder names; the default)
* ``templates``  prompt templates: a built-in set or a list (default ``generic``)
* ``workers``    decoding threads (default: the CPUs this job may use, at most 8)
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mergemix.data.clip_datasets import resolve_classnames, resolve_templates
from mergemix.data.registry import RawDataset, register_source
from mergemix.pins import commit_or_none

log = logging.getLogger("mergemix.data")
SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
COMMON = {"image_size": None, "classnames": None, "templates": None, "workers": None}


def to_model_input(img, size: int) -> np.ndarray:
    """PIL image -> uint8 [3, size, size]: shorter side to ``size`` (bicubic), then a centre crop."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, max(size, int(size * h / w))
    else:
        nw, nh = max(size, int(size * w / h)), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _decode_all(images, size: int, workers: int, out: np.ndarray, start: int) -> None:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, arr in enumerate(pool.map(lambda im: to_model_input(im, size), images)):
            out[start + i] = arr


def _common(spec: dict) -> tuple[int, int]:
    size = int(spec.get("image_size", 224))
    if size < 8:
        raise ValueError(f"image_size must be at least 8, got {size}")
    resolve_templates(spec.get("templates"))  # fail at prepare time, not in the head stage
    return size, int(spec.get("workers", min(8, len(os.sched_getaffinity(0)))))


# --- an image folder ------------------------------------------------------------------------------
def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@register_source("image_folder", params={"path": None, **COMMON}, local_paths={"path": "folder"})
def image_folder(spec: dict, seed: int, local_dir=None) -> RawDataset:
    """``path/<class>/*.jpg`` (all splits carved), or ``path/{train,val,test}/<class>/*.jpg``
    (fixed splits; ``train`` required, a missing ``val`` is carved from train)."""
    from PIL import Image

    if "path" not in spec:
        raise ValueError("source image_folder needs 'path': a folder with one subfolder per class")
    root = Path(spec["path"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder path {root} is not a folder")
    size, workers = _common(spec)
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise ValueError(f"{root} has {sorted(split_dirs)} but no train/ folder; add one or use class folders only")
    parts = split_dirs or {None: root}
    classes = sorted(set().union(*(_class_folders(d) for d in parts.values())))
    if len(classes) < 2:
        raise ValueError(f"{root}: found {len(classes)} class folder(s); need at least 2")
    files, labels, splits = [], [], {}
    for split, folder in parts.items():
        start = len(files)
        for label, c in enumerate(classes):
            found = _images_in(folder / c) if (folder / c).is_dir() else []
            files += found
            labels += [label] * len(found)
        if split is not None:
            splits[split] = np.arange(start, len(files))
    if not files:
        raise ValueError(f"{root}: no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)

    def load(p):
        with Image.open(p) as im:
            return im.copy()

    for s in range(0, len(files), 512):
        _decode_all([load(p) for p in files[s : s + 512]], size, workers, x, s)
    return RawDataset(
        x=x,
        y=np.asarray(labels, dtype=np.int64),
        classes=resolve_classnames(spec.get("classnames"), classes),
        splits=splits,
        info={"root": str(root), "folder_classes": classes, "files": len(files)},
    )


# --- any Hugging Face dataset ---------------------------------------------------------------------
HF_PARAMS = {
    "hub_id": None,
    "revision": None,
    "config": None,
    "splits": None,
    "image_column": None,
    "label_column": None,
    **COMMON,
}


def _split_map(spec: dict) -> dict[str, str]:
    """Our split name -> the dataset's split name (default: train and test; val is carved)."""
    m = dict(spec.get("splits") or {"train": "train", "test": "test"})
    bad = sorted(set(m) - set(SPLIT_NAMES))
    if bad or "train" not in m:
        raise ValueError(
            f"splits: {m} must map train (required), and optionally val and test, to the dataset's split names"
        )
    return m


def _load_remote_or_local(spec: dict, their_split: str, cache_dir=None):
    import datasets

    src = spec["hub_id"]
    local = Path(str(src)).expanduser()
    if local.exists():
        if (local / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(local))[their_split]
        if (local / "state.json").exists():
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(str(local), name=spec.get("config"), split=their_split, cache_dir=cache_dir)
    return datasets.load_dataset(
        src, name=spec.get("config"), split=their_split, revision=spec.get("revision"), cache_dir=cache_dir
    )


def download_hf(spec: dict, out_dir: Path) -> dict:
    """Fetch each split with ``datasets.load_dataset`` and save it under ``out_dir/<split>``.

    The ``datasets`` cache goes to a temporary folder inside ``out_dir`` that is deleted afterwards,
    so the data is not kept twice (nor in a home directory with a small quota on a cluster)."""
    import shutil

    if "hub_id" not in spec:
        raise ValueError("source hf_images needs 'hub_id': a Hugging Face dataset id or a local dataset path")
    from_hub = not Path(str(spec["hub_id"])).expanduser().exists()
    if from_hub and spec.get("revision") in (None, "main"):
        log.warning(
            "dataset %s is not pinned to a commit (revision: %r); pin it for reproducible data "
            "(mergemix pin-revisions <config> --write, before downloading)",
            spec["hub_id"],
            spec.get("revision"),
        )
    cols = [spec.get("image_column", "image"), spec.get("label_column", "label")]
    rows = {}
    cache = Path(out_dir) / ".datasets_cache"
    for ours, theirs in _split_map(spec).items():
        ds = _load_remote_or_local(spec, theirs, str(cache))
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"{spec['hub_id']} split {theirs!r} has no column(s) {missing}; its columns: {ds.column_names}; "
                "set image_column / label_column"
            )
        ds.select_columns(cols).save_to_disk(str(Path(out_dir) / ours))
        rows[ours] = ds.num_rows
    shutil.rmtree(cache, ignore_errors=True)
    commit = commit_or_none(spec["hub_id"], spec.get("revision")) if from_hub else None
    return {"hub_id": spec["hub_id"], "revision": spec.get("revision"), "resolved_revision": commit, "rows": rows}


@register_source("hf_images", params=HF_PARAMS, download=download_hf)
def hf_images(spec: dict, seed: int, local_dir=None) -> RawDataset:
    import datasets

    if local_dir is None:
        raise ValueError("source hf_images reads the files of its download step; run the download_data rule first")
    size, workers = _common(spec)
    img_col, lab_col = spec.get("image_column", "image"), spec.get("label_column", "label")
    parts = {ours: datasets.load_from_disk(str(Path(local_dir) / ours)) for ours in _split_map(spec)}
    feature = next(iter(parts.values())).features[lab_col]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    labels = {s: np.asarray(ds[lab_col]) for s, ds in parts.items()}
    if names is None and not all(np.issubdtype(v.dtype, np.integer) for v in labels.values()):
        # string labels: the classes in sorted order
        names = sorted(set().union(*(map(str, v) for v in labels.values())))
        index = {c: i for i, c in enumerate(names)}
        labels = {s: np.asarray([index[str(c)] for c in v]) for s, v in labels.items()}
    # integer labels without names need classnames (a built-in set or a list)
    classes = resolve_classnames(spec.get("classnames"), names)
    total = sum(ds.num_rows for ds in parts.values())
    x = np.empty((total, 3, size, size), dtype=np.uint8)
    y, splits, start = [], {}, 0
    for ours, ds in parts.items():
        ds = ds.select_columns([img_col])
        if not isinstance(ds.features[img_col], datasets.Image):
            ds = ds.cast_column(img_col, datasets.Image())
        pos = start
        for batch in ds.iter(batch_size=512):
            _decode_all(batch[img_col], size, workers, x, pos)
            pos += len(batch[img_col])
        splits[ours] = np.arange(start, pos)
        y.append(labels[ours].astype(np.int64))
        start = pos
        log.info("decoded %s: %d images", ours, ds.num_rows)
    y = np.concatenate(y)
    if y.min() < 0 or y.max() >= len(classes):
        raise ValueError(
            f"labels of {spec['hub_id']} fall outside 0..{len(classes) - 1} ({len(classes)} class names); fix classnames"
        )
    return RawDataset(
        x=x,
        y=y,
        classes=classes,
        splits=splits,
        info={"hub_id": spec["hub_id"], "revision": spec.get("revision"), "data_classes": names},
    )
