"""The digit domains of the embedded studies: determinism, value range, label permutations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mergemix.data import digits as D
from mergemix.data.registry import check_spec

ROOT = Path(__file__).resolve().parents[1]
N = 120  # images per test call (the transforms are per image; the full set is 1,797)
NEW = ["shear", "zoom_in", "zoom_out", "occlude", "erode", "clutter", "saltpepper", "stripes"]


@pytest.fixture(scope="module")
def base():
    return D._base_images()


@pytest.fixture()
def small(monkeypatch, base):
    """The source on the first N images only, so every domain can be built twice quickly."""
    imgs, labels = base
    monkeypatch.setattr(D, "_base_images", lambda: (imgs[:N].copy(), labels[:N].copy()))
    return imgs[:N], labels[:N]


def build(spec, seed=0):
    return D.digits({"source": "digits", **spec}, seed)


@pytest.mark.parametrize("domain", sorted(D.DOMAINS))
def test_domain_deterministic_in_range(small, domain):
    a, b = build({"domain": domain}, 7), build({"domain": domain}, 7)
    assert a.x.shape == (N, 1, D.SIZE, D.SIZE) and a.x.dtype == np.float32
    assert a.y.shape == (N,) and a.y.dtype == np.int64
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert np.isfinite(a.x).all() and a.x.min() >= 0.0 and a.x.max() <= 1.0
    np.testing.assert_array_equal(a.y, small[1])  # no permute: true labels
    np.testing.assert_array_equal(a.groups, np.arange(N))


@pytest.mark.parametrize("domain", NEW)
def test_new_domains_differ_from_clean_and_use_the_seed(small, domain):
    clean = build({"domain": "clean"}).x
    x0, x1 = build({"domain": domain}, 0).x, build({"domain": domain}, 1).x
    assert np.abs(x0 - clean).mean() > 0.02, f"{domain} is too close to clean digits"
    if domain != "erode":  # erode is the only deterministic new transform
        assert not np.array_equal(x0, x1), f"{domain} ignores its seed"


def test_mixed_is_deterministic_and_draws_from_its_mix(small):
    spec = {"domain": "mixed", "mix": {"rotate": 1.0, "noise": 1.0, "contrast": 0.7, "squeeze": 1.0}}
    a, b = build(spec, 3), build(spec, 3)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.min() >= 0.0 and a.x.max() <= 1.0 and a.x.shape == (N, 1, D.SIZE, D.SIZE)
    assert not np.array_equal(a.x, build(spec, 4).x)
    # a one-domain mix of a deterministic transform is that domain
    np.testing.assert_array_equal(build({"domain": "mixed", "mix": ["squeeze"]}).x, build({"domain": "squeeze"}).x)
    # deterministic transforms mixed: each image is one of them
    m = build({"domain": "mixed", "mix": ["mirror", "squeeze"]}).x
    mirror, squeeze = build({"domain": "mirror"}).x, build({"domain": "squeeze"}).x
    is_m = (m == mirror).all(axis=(1, 2, 3))
    is_s = (m == squeeze).all(axis=(1, 2, 3))
    assert (is_m | is_s).all() and is_m.any() and is_s.any()
    for bad in ({"domain": "mixed"}, {"domain": "rotate", "mix": ["noise"]}, {"domain": "mixed", "mix": ["nope"]}):
        with pytest.raises(ValueError):
            build(bad)


def test_partial_permutation_cycles_the_listed_classes(small):
    imgs, labels = small
    perm = D.label_permutation([3, 5, 8])
    np.testing.assert_array_equal(perm, [0, 1, 2, 5, 4, 8, 6, 7, 3, 9])
    r = build({"domain": "shift", "permute": [3, 5, 8]}, 0)
    np.testing.assert_array_equal(r.y[labels == 3], 5)
    np.testing.assert_array_equal(r.y[labels == 5], 8)
    np.testing.assert_array_equal(r.y[labels == 8], 3)
    keep = ~np.isin(labels, [3, 5, 8])
    np.testing.assert_array_equal(r.y[keep], labels[keep])
    # the images are those of the same domain without the permutation
    np.testing.assert_array_equal(r.x, build({"domain": "shift"}, 0).x)
    assert r.info["label_map"] == perm.tolist()


@pytest.mark.parametrize("bad", [[3], [3, 3], [3, 10], [-1, 2], "35", 3, [1.5, 2], [True, 2]])
def test_bad_permutations_are_refused(bad):
    with pytest.raises(ValueError):
        D.label_permutation(bad)


def test_label_map_labels_each_digit_as_listed(small):
    imgs, labels = small
    parity = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    r = build({"domain": "shift", "label_map": parity}, 0)
    np.testing.assert_array_equal(r.y, labels % 2)
    np.testing.assert_array_equal(r.x, build({"domain": "shift"}, 0).x)  # the same images
    assert r.info["label_map"] == parity and r.classes == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"label_map": [0, 1]}, "ten labels 0-9"),
        ({"label_map": [0] * 9 + [10]}, "ten labels 0-9"),
        ({"label_map": [0] * 9 + [True]}, "ten labels 0-9"),
        ({"label_map": "0101010101"}, "ten labels 0-9"),
        ({"label_map": list(range(10)), "permute": [1, 2]}, "not both"),
    ],
)
def test_bad_label_maps_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        D.label_mapping(spec)


def config(name):
    return yaml.safe_load((ROOT / "config" / name).read_text())


def test_embedded_study_relabel_labels_each_digit_by_its_parity(base):
    """config.yaml's relabel: every digit d is labelled d mod 2 (0 even, 1 odd), whatever the seed."""
    cfg = config("config.yaml")
    spec = cfg["datasets"]["relabel"]
    imgs, labels = base
    expected = np.arange(10) % 2
    np.testing.assert_array_equal(D.label_mapping(spec), expected)
    assert (expected != np.arange(10)).sum() == 8  # only 0 and 1 keep their label
    ys = []
    for seed in (0, 1):
        r = D.digits(spec, seed)
        for d in range(10):
            np.testing.assert_array_equal(r.y[labels == d], expected[d])
        assert r.x.shape == (len(labels), 1, D.SIZE, D.SIZE) and 0.0 <= r.x.min() and r.x.max() <= 1.0
        ys.append(r.y)
    np.testing.assert_array_equal(ys[0], ys[1])  # the relabelling does not depend on the seed
    # it looks like the targets: its mix is the targets' own transforms at their strengths
    targets = cfg["targets"]
    assert "relabel" not in targets
    assert set(spec["mix"]) == set(targets)
    for t in targets:
        assert spec["mix"][t] == cfg["datasets"][t].get("strength", 1.0)
        assert cfg["datasets"][t]["domain"] == t


@pytest.mark.parametrize("name", ["config.yaml", "digits_wide.yaml"])
def test_study_specs_are_accepted(name):
    cfg = config(name)
    for ds, spec in cfg["datasets"].items():
        assert check_spec(ds, spec) == [], ds
    assert check_spec("x", {"source": "digits", "domain": "nope"})  # and a bad one is not


def test_wide_study_has_thirteen_distinct_domains():
    cfg = config("digits_wide.yaml")
    doms = {(s["domain"], s.get("strength", 1.0)) for s in cfg["datasets"].values()}
    assert len(cfg["datasets"]) >= 13 and len(doms) == len(cfg["datasets"])
    assert cfg["targets"] == "all"
    base_cfg = config("config.yaml")
    for key in ("backend", "pretrain", "split"):
        assert cfg[key] == base_cfg[key], key
