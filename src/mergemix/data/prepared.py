"""Deterministic train/val/test splits and the prepared on-disk format.

A prepared dataset is a folder with ``arrays.safetensors`` (``x``, ``y``) and ``splits.json``
(the indices of each split, the seed, the spec and class names), written once by the prepare
stage. Reruns read the saved indices, so splits never drift. ``splits.json`` also records the
data file's size, sha256 (and the arrays' shapes), checked on every load, so a truncated or
overwritten data file is refused instead of trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergemix import io
from mergemix.data.registry import RawDataset, get_source
from mergemix.settings import Split

SPLITS = ("train", "val", "test")


def split_groups(groups: np.ndarray, fractions: Split, seed: int) -> dict[str, np.ndarray]:
    """Assign whole groups to val/test/train by seeded permutation (``fractions.val`` and ``.test``).
    Returns sorted sample indices."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(uniq)
    n = len(perm)
    n_val = int(round(fractions.val * n))
    n_test = int(round(fractions.test * n))
    if n_val < 1 or n_test < 1 or n_val + n_test >= n:
        raise ValueError(
            f"split fractions val={fractions.val}, test={fractions.test} leave an empty split for "
            f"{n} groups; choose fractions so that val, test and train each get at least one group"
        )
    assign = {
        "val": perm[:n_val],
        "test": perm[n_val : n_val + n_test],
        "train": perm[n_val + n_test :],
    }
    return {k: np.sort(np.flatnonzero(np.isin(groups, v))) for k, v in assign.items()}


def make_splits(raw: RawDataset, split_cfg: Split, subsample_seed: int) -> dict[str, np.ndarray]:
    n = len(raw.x)
    groups = raw.groups if raw.groups is not None else np.arange(n)
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in raw.splits.items()}
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        if "train" in splits and missing == ["val"]:
            # carve a validation split from train: a fraction, capped, seeded
            tr = splits["train"]
            rng = np.random.default_rng(split_cfg.seed)
            n_val = min(int(round(split_cfg.val_from_train * len(tr))), split_cfg.val_cap)
            perm = rng.permutation(tr)
            splits["val"], splits["train"] = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        else:
            splits = split_groups(groups, split_cfg, split_cfg.seed)
    rng = np.random.default_rng(subsample_seed)
    for name in SPLITS:
        cap = getattr(split_cfg, f"max_{name}")
        if cap and len(splits[name]) > cap:
            splits[name] = np.sort(rng.choice(splits[name], size=cap, replace=False))
    return splits


def prepare_dataset(name: str, spec: dict, split_cfg: Split, out_dir, local_dir=None) -> dict:
    """Build dataset ``name`` from its spec and write it under ``out_dir``. Returns the split info.

    ``split_cfg``: the ``split`` settings (a mapping is converted with the schema's defaults,
    :meth:`mergemix.settings.Section.coerce`). ``local_dir`` is where the source's download step
    put its files, for sources that have one.
    """
    out_dir = Path(out_dir)
    split_cfg = Split.coerce(split_cfg, "split")
    seed = int(split_cfg.seed)
    # the dataset's own randomness (transforms, subsampling) is seeded from the study seed and its name
    own_seed = _name_seed(name, seed)
    raw = get_source(spec["source"])(spec, own_seed, Path(local_dir) if local_dir else None)
    splits = make_splits(raw, split_cfg, own_seed + 1)
    for a in SPLITS:
        for b in SPLITS:
            if a < b and np.intersect1d(splits[a], splits[b]).size:
                raise AssertionError(f"splits {a} and {b} of {name} overlap")
    if isinstance(raw.x, np.ndarray):
        arrays = {"x": raw.x}
        if raw.y is not None:
            arrays["y"] = np.asarray(raw.y, dtype=np.int64)
        sha = io.save_arrays(out_dir / "arrays.safetensors", arrays)
        data = {
            "file": "arrays.safetensors",
            "sha256": sha,
            "arrays": {k: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype))} for k, v in arrays.items()},
        }
    else:
        records = list(raw.x)
        if raw.y is not None:
            records = [{**r, "label": int(l)} for r, l in zip(records, raw.y)]
        sha = io.write_jsonl(out_dir / "samples.jsonl", records)
        data = {"file": "samples.jsonl", "sha256": sha, "records": len(records)}
    data["bytes"] = (out_dir / data["file"]).stat().st_size
    info = {
        "name": name,
        "spec": spec,
        "split": split_cfg.to_dict(),
        "classes": list(raw.classes),
        "sizes": {k: int(len(v)) for k, v in splits.items()},
        "indices": {k: v.tolist() for k, v in splits.items()},
        "info": raw.info,
        "data": data,  # checked by load_prepared
    }
    io.write_json(out_dir / "splits.json", info)
    return info


def _name_seed(name: str, seed: int) -> int:
    import zlib

    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**31)


@dataclass
class PreparedDataset:
    name: str
    x: np.ndarray | list  # array samples, or a list of records (JSON lines)
    y: np.ndarray | None
    classes: list[str]
    indices: dict[str, np.ndarray]
    spec: dict = None
    path: Path = None
    sha256: str = None  # of the prepared data file (recorded by prepare, verified on load)

    def split(self, which: str):
        """(samples, labels) of a split; labels are None for record datasets without labels."""
        idx = self.indices[which]
        x = np.asarray(self.x[idx]) if isinstance(self.x, np.ndarray) else [self.x[i] for i in idx]
        return x, (self.y[idx] if self.y is not None else None)


class PreparedDataError(ValueError):
    """A prepared dataset folder whose files are missing, truncated or overwritten."""


def _rebuild(data_dir: Path) -> str:
    return f"delete {data_dir} and rerun snakemake (it rebuilds the dataset with `mergemix prepare`)"


def verify_prepared(data_dir, meta: dict) -> Path:
    """Check the data file against the size, sha256 and shapes ``splits.json`` recorded; returns its path."""
    data_dir = Path(data_dir)
    rec = meta.get("data")
    if not isinstance(rec, dict) or not {"file", "sha256", "bytes"} <= set(rec):
        raise PreparedDataError(
            f"{data_dir / 'splits.json'}: no checksum of the prepared data (written by an older mergemix); {_rebuild(data_dir)}"
        )
    path = data_dir / rec["file"]
    if not path.is_file():
        raise PreparedDataError(f"{path} is missing; {_rebuild(data_dir)}")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise PreparedDataError(
            f"{path}: {size} bytes, but splits.json records {rec['bytes']}: the file was truncated or overwritten; "
            f"{_rebuild(data_dir)}"
        )
    sha = io.sha256_file(path)
    if sha != rec["sha256"]:
        raise PreparedDataError(
            f"{path}: sha256 {sha} differs from {rec['sha256']} recorded in splits.json: the file was overwritten; "
            f"{_rebuild(data_dir)}"
        )
    if "arrays" in rec:
        try:
            header = io.arrays_header(path)
        except ValueError as e:
            raise PreparedDataError(f"{e}; {_rebuild(data_dir)}") from None
        for key, want in rec["arrays"].items():
            got = header.get(key, {}).get("shape")
            if got != want["shape"]:
                raise PreparedDataError(
                    f"{path}: array {key!r} has shape {got}, splits.json records {want['shape']}; {_rebuild(data_dir)}"
                )
    return path


def load_prepared(data_dir) -> PreparedDataset:
    data_dir = Path(data_dir)
    if not (data_dir / "splits.json").is_file():
        raise PreparedDataError(
            f"{data_dir / 'splits.json'} is missing: {data_dir} is not a prepared dataset; {_rebuild(data_dir)}"
        )
    try:
        meta = io.read_json(data_dir / "splits.json")
    except ValueError as e:
        raise PreparedDataError(f"{data_dir / 'splits.json'} is not valid JSON ({e}); {_rebuild(data_dir)}") from None
    path = verify_prepared(data_dir, meta)
    if path.suffix == ".safetensors":
        arrays = io.map_arrays(path)  # memory-mapped: splits are sliced, not read whole
        x = arrays["x"]
        y = np.array(arrays["y"]) if "y" in arrays else None
    else:
        x = io.read_jsonl(path)
        y = np.asarray([r["label"] for r in x], dtype=np.int64) if x and "label" in x[0] else None
    return PreparedDataset(
        name=meta["name"],
        x=x,
        y=y,
        classes=meta["classes"],
        indices={k: np.asarray(v, dtype=np.int64) for k, v in meta["indices"].items()},
        spec=meta["spec"],
        path=data_dir,
        sha256=meta["data"]["sha256"],
    )
