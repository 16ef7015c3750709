"""Deterministic train/val/test splits and the prepared on-disk format.

A prepared dataset is a folder with ``arrays.safetensors`` (``x``, ``y``) and ``splits.json``
(the indices of each split, the seed, the spec and class names), written once by the prepare
stage. Reruns read the saved indices, so splits never drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergemix import io
from mergemix.data.registry import RawDataset, get_source

SPLITS = ("train", "val", "test")


def split_groups(groups: np.ndarray, fractions: dict, seed: int) -> dict[str, np.ndarray]:
    """Assign whole groups to val/test/train by seeded permutation. Returns sorted sample indices."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    n = len(perm)
    n_val = int(round(fractions["val"] * n))
    n_test = int(round(fractions["test"] * n))
    if n_val < 1 or n_test < 1 or n_val + n_test >= n:
        raise ValueError(
            f"split fractions val={fractions['val']}, test={fractions['test']} leave an empty split for "
            f"{n} groups; choose fractions so that val, test and train each get at least one group"
        )
    assign = {
        "val": perm[:n_val],
        "test": perm[n_val : n_val + n_test],
        "train": perm[n_val + n_test :],
    }
    return {k: np.sort(np.flatnonzero(np.isin(groups, v))) for k, v in assign.items()}


def make_splits(raw: RawDataset, split_cfg: dict, subsample_seed: int) -> dict[str, np.ndarray]:
    groups = raw.groups if raw.groups is not None else np.arange(len(raw.y))
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in raw.splits.items()}
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        if "train" in splits and missing == ["val"]:
            # carve a validation split from train: a fraction, capped, seeded
            tr = splits["train"]
            rng = np.random.default_rng(split_cfg["seed"])
            n_val = min(int(round(split_cfg.get("val_from_train", 0.1) * len(tr))), split_cfg.get("val_cap", 5000))
            perm = rng.permutation(tr)
            splits["val"], splits["train"] = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        else:
            pool = np.arange(len(raw.y))
            splits = split_groups(groups[pool], split_cfg, split_cfg["seed"])
    rng = np.random.default_rng(subsample_seed)
    for name in SPLITS:
        cap = split_cfg.get(f"max_{name}")
        if cap and len(splits[name]) > cap:
            splits[name] = np.sort(rng.choice(splits[name], size=cap, replace=False))
    return splits


def prepare_dataset(name: str, spec: dict, split_cfg: dict, out_dir) -> dict:
    """Build dataset ``name`` from its spec and write it under ``out_dir``. Returns the split info."""
    out_dir = Path(out_dir)
    seed = int(split_cfg["seed"])
    # the dataset's own randomness (transforms, subsampling) is seeded from the study seed and its name
    own_seed = _name_seed(name, seed)
    raw = get_source(spec["source"])(spec, own_seed)
    splits = make_splits(raw, split_cfg, own_seed + 1)
    for a in SPLITS:
        for b in SPLITS:
            if a < b and np.intersect1d(splits[a], splits[b]).size:
                raise AssertionError(f"splits {a} and {b} of {name} overlap")
    io.save_arrays(out_dir / "arrays.safetensors", {"x": raw.x, "y": raw.y.astype(np.int64)})
    info = {
        "name": name,
        "spec": spec,
        "split": split_cfg,
        "classes": list(raw.classes),
        "sizes": {k: int(len(v)) for k, v in splits.items()},
        "indices": {k: v.tolist() for k, v in splits.items()},
        "info": raw.info,
    }
    io.write_json(out_dir / "splits.json", info)
    return info


def _name_seed(name: str, seed: int) -> int:
    import zlib

    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**31)


@dataclass
class PreparedDataset:
    name: str
    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    indices: dict[str, np.ndarray]

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices[which]
        return self.x[idx], self.y[idx]


def load_prepared(data_dir) -> PreparedDataset:
    data_dir = Path(data_dir)
    meta = io.read_json(data_dir / "splits.json")
    arrays = io.load_arrays(data_dir / "arrays.safetensors")
    return PreparedDataset(
        name=meta["name"],
        x=arrays["x"],
        y=arrays["y"],
        classes=meta["classes"],
        indices={k: np.asarray(v, dtype=np.int64) for k, v in meta["indices"].items()},
    )
