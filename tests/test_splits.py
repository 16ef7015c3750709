import json

import numpy as np

from mergemix.data.prepared import load_prepared, prepare_dataset

SPLIT = {"seed": 3, "val": 0.2, "test": 0.3, "max_train": 300}


def test_splits_are_deterministic_and_disjoint(tmp_path):
    a = prepare_dataset("rot", {"source": "digits", "domain": "rotate"}, SPLIT, tmp_path / "a")
    b = prepare_dataset("rot", {"source": "digits", "domain": "rotate"}, SPLIT, tmp_path / "b")
    assert a["indices"] == b["indices"]
    assert (tmp_path / "a/arrays.safetensors").read_bytes() == (tmp_path / "b/arrays.safetensors").read_bytes()
    idx = {k: set(v) for k, v in a["indices"].items()}
    assert not idx["train"] & idx["val"] and not idx["train"] & idx["test"] and not idx["val"] & idx["test"]
    assert len(idx["train"]) == 300
    saved = json.loads((tmp_path / "a/splits.json").read_text())
    assert saved["indices"] == a["indices"]
    d = load_prepared(tmp_path / "a")
    x, y = d.split("test")
    assert x.shape == (len(idx["test"]), 1, 16, 16) and set(np.unique(y)) == set(range(10))


def test_a_different_seed_gives_different_splits(tmp_path):
    a = prepare_dataset("rot", {"source": "digits", "domain": "rotate"}, SPLIT, tmp_path / "a")
    b = prepare_dataset("rot", {"source": "digits", "domain": "rotate"}, {**SPLIT, "seed": 4}, tmp_path / "b")
    assert a["indices"]["test"] != b["indices"]["test"]


def test_no_test_image_of_one_domain_is_in_another_domains_train(tmp_path):
    # the split is made per source image with the study seed, shared by all domains
    a = prepare_dataset("rot", {"source": "digits", "domain": "rotate"}, SPLIT, tmp_path / "a")
    b = prepare_dataset("noise", {"source": "digits", "domain": "noise"}, SPLIT, tmp_path / "b")
    assert not set(a["indices"]["test"]) & set(b["indices"]["train"])
    assert a["indices"]["test"] == b["indices"]["test"]
