"""The CLIP backend and the image sources, offline: a tiny open_clip architecture with local
"pre-trained" weights, and tiny datasets in the formats the real loaders read."""

import socket

import numpy as np
import pytest
import torch

from clip_fixtures import (
    IMAGE_SIZE,
    TINY_NAME,
    backend_spec,
    make_images,
    write_hf_disk,
    write_hf_parquet,
    write_image_folder,
    write_tiny_weights,
)
from mergemix import io, stages
from mergemix.backends import get_backend
from mergemix.data.clip_datasets import CLASSNAMES, TEMPLATES, resolve_classnames
from mergemix.data.prepared import load_prepared

open_clip = pytest.importorskip("open_clip")

SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.2, "val_cap": 50}
HP = {
    "epochs": 6,
    "lr": 1e-3,
    "batch_size": 16,
    "optimizer": "adamw",
    "weight_decay": 0.1,
    "schedule": "cosine",
    "warmup_frac": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three prepared datasets (image folder, saved `datasets`, parquet), the fetched model, heads."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("clip")
    weights = write_tiny_weights(tmp / "weights.pt")
    specs = {
        "folder": {
            "source": "image_folder",
            "path": str(write_image_folder(tmp / "folder", ["red", "green", "blue"], 12, 6, 0)),
            "image_size": IMAGE_SIZE,
        },
        "disk": {
            "source": "hf_images",
            "hub_id": str(write_hf_disk(tmp / "disk", ["red", "green", "blue", "yellow"], 12, 6, 10)),
            "image_size": IMAGE_SIZE,
            "templates": "cars",
        },
        "parquet": {
            "source": "hf_images",
            "hub_id": str(write_hf_parquet(tmp / "pq", ["red", "green", "blue"], 12, 6, 20)),
            "image_size": IMAGE_SIZE,
            "templates": ["a {} thing.", "the colour {}."],
        },
    }
    dirs = {}
    for name, spec in specs.items():
        local = None
        if spec["source"] == "hf_images":
            local = tmp / "downloads" / name
            stages.download(name, spec, local)
        stages.prepare(name, spec, SPLIT, tmp / "data" / name, local)
        dirs[name] = tmp / "data" / name
    backend = backend_spec(weights)
    pretrained = tmp / "models" / "pretrained" / "model.safetensors"
    stages.fetch_pretrained(backend, pretrained)
    for name in specs:
        stages.head(backend, pretrained, dirs[name], pretrained.parent / "heads" / f"{name}.safetensors")
    yield {"tmp": tmp, "weights": weights, "backend": backend, "pretrained": pretrained, "dirs": dirs, "specs": specs}
    mp.undo()


def direct_model(weights):
    """open_clip's own model from the weights file, without mergemix."""
    return open_clip.create_model(TINY_NAME, pretrained=str(weights)).eval()


def test_zeroshot_head_equals_direct_computation(study):
    model = direct_model(study["weights"])
    tok = open_clip.get_tokenizer(TINY_NAME)
    for name, templates in (
        ("disk", TEMPLATES["cars"]),
        ("parquet", ["a {} thing.", "the colour {}."]),
        ("folder", TEMPLATES["generic"]),
    ):
        data = load_prepared(study["dirs"][name])
        state, manifest = io.load_model(study["pretrained"].parent / "heads" / f"{name}.safetensors")
        assert manifest["classnames"] == data.classes and manifest["templates"] == templates
        expected = []
        with torch.no_grad():
            for c in data.classes:
                per_template = [model.encode_text(tok([t.format(c)]))[0] for t in templates]
                e = torch.stack([v / v.norm() for v in per_template]).mean(0)
                expected.append(e / e.norm() * model.logit_scale.exp())
        torch.testing.assert_close(state["weight"], torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert load_prepared(study["dirs"]["folder"]).classes == ["blue colour", "green colour", "red colour"]


def test_evaluate_matches_open_clip_preprocessing_and_head(study):
    """Accuracy from the cached uint8 inputs equals open_clip's own eval transform on the source images."""
    data = load_prepared(study["dirs"]["disk"])
    backend = get_backend(study["backend"])
    model = backend.load_pretrained(study["pretrained"])
    head = io.load_model(study["pretrained"].parent / "heads" / "disk.safetensors")[0]["weight"]
    ref = direct_model(study["weights"])
    transform = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    images, labels = make_images(["red", "green", "blue", "yellow"], 6, 11)  # the test split of "disk"
    with torch.no_grad():
        f = ref.encode_image(torch.stack([transform(im) for im in images]))
        pred = ((f / f.norm(dim=-1, keepdim=True)) @ head.T).argmax(1).numpy()
        x_test, y_test = data.split("test")
        assert np.array_equal(y_test, labels)
        ours = model(torch.from_numpy(x_test))
    torch.testing.assert_close(ours, f, rtol=1e-4, atol=1e-4)
    assert backend.evaluate(model, data, "test") == pytest.approx(float(np.mean(pred == np.asarray(labels))))


def test_fetch_and_load_never_touch_the_network(study, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    manifest = io.read_json(study["pretrained"].with_suffix(".json"))
    assert manifest["source_sha256"] == io.sha256_file(study["weights"])
    assert manifest["preprocess"]["image_size"] == IMAGE_SIZE
    backend = get_backend(study["backend"])
    model = backend.load_pretrained(study["pretrained"])
    ref = direct_model(study["weights"])
    params = backend.merge_params(model)
    assert params and all(k.startswith("visual.") for k in params)
    assert set(params) == {f"visual.{k}" for k, _ in ref.visual.named_parameters()}
    for k, p in params.items():
        assert torch.equal(p.detach(), ref.visual.get_parameter(k[len("visual.") :]))


def test_missing_weights_file_and_wrong_image_size_are_refused(study, tmp_path):
    spec = backend_spec(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        get_backend(spec).fetch_pretrained(tmp_path / "m.safetensors")
    big = {"source": "image_folder", "path": study["specs"]["folder"]["path"], "image_size": 24}
    stages.prepare("big", big, SPLIT, tmp_path / "big")
    backend = get_backend(study["backend"])
    model = backend.load_pretrained(study["pretrained"])
    with pytest.raises(ValueError, match="image_size: 16"):
        backend.evaluate(model, load_prepared(tmp_path / "big"), "test")
    with pytest.raises(ValueError, match="prepared at 24 px .* set image_size: 16"):  # already in the head stage
        stages.head(study["backend"], study["pretrained"], tmp_path / "big", tmp_path / "big_head.safetensors")


def test_finetune_changes_only_the_image_encoder_and_learns_every_dataset(study, tmp_path):
    backend = get_backend(study["backend"])
    model = backend.load_pretrained(study["pretrained"])
    data = [load_prepared(study["dirs"][n]) for n in ("folder", "disk", "parquet")]
    before = {d.name: backend.evaluate(model, d, "test") for d in data}
    heads_before = {p.name: io.sha256_file(p) for p in (study["pretrained"].parent / "heads").glob("*.safetensors")}
    theta0 = {k: v.detach().clone() for k, v in backend.merge_params(model).items()}
    metrics = backend.finetune(model, data, HP)
    after = {d.name: backend.evaluate(model, d, "test") for d in data}
    # multi-head training: each dataset is learnt with its own head (the colour tasks are easy)
    for d in data:
        assert after[d.name] >= 0.9 > before[d.name], (before, after)
    assert metrics["n_train"] == sum(len(d.indices["train"]) for d in data)
    assert set(metrics["val_acc_per_dataset"]) == {"folder", "disk", "parquet"}
    changed = [k for k, v in backend.merge_params(model).items() if not torch.equal(v.detach(), theta0[k])]
    assert len(changed) == len(theta0)
    # what is saved and merged is the image encoder; the text tower and the heads stay untouched
    out = tmp_path / "ft" / "model.safetensors"
    io.save_model(out, backend.state_to_save(model), {"kind": "finetuned"})
    assert set(io.load_model(out)[0]) == set(theta0)
    assert heads_before == {
        p.name: io.sha256_file(p) for p in (study["pretrained"].parent / "heads").glob("*.safetensors")
    }
    fresh = backend.load_pretrained(study["pretrained"])
    backend.load_state(fresh, io.load_model(out)[0])
    assert backend.evaluate(fresh, data[1], "test") == after["disk"]


def test_seeded_finetune_is_reproducible(study):
    data = [load_prepared(study["dirs"]["parquet"])]
    states = []
    for _ in range(2):
        backend = get_backend(study["backend"])
        model = backend.load_pretrained(study["pretrained"])
        backend.finetune(model, data, {**HP, "epochs": 1})
        states.append(backend.state_to_save(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_weighted_mixture_leaves_out_a_zero_weight_dataset(study, monkeypatch):
    """The weighted fine-tune of merge_eval.strategy: weights on CLIP: examples are drawn per
    dataset in proportion (a weight of 0 never drawn), each scored by its own dataset's head."""
    from mergemix.backends import training

    backend = get_backend(study["backend"])
    model = backend.load_pretrained(study["pretrained"])
    data = [load_prepared(study["dirs"][n]) for n in ("folder", "disk", "parquet")]
    sizes = [len(d.indices["train"]) for d in data]
    seen = []
    real_fit = training.fit

    def spy(params, n, step_loss, hp, **kw):
        return real_fit(params, n, lambda idx: seen.extend(idx.tolist()) or step_loss(idx), hp, **kw)

    monkeypatch.setattr("mergemix.backends.clip.fit", spy)
    metrics = backend.finetune(model, data, {**HP, "epochs": 1, "mixture_weights": {"folder": 1.0, "parquet": 1.0}})
    assert seen and all(not (sizes[0] <= i < sizes[0] + sizes[1]) for i in seen)  # disk (weight 0) never drawn
    assert len(seen) == sizes[0] + sizes[2] and metrics["steps"] >= 1


def test_embed_gives_image_embeddings_of_the_split(study):
    backend = get_backend(study["backend"])
    model = backend.load_pretrained(study["pretrained"])
    data = load_prepared(study["dirs"]["folder"])
    emb = backend.embed(model, data, "val")
    assert emb.dtype == np.float32 and emb.shape == (len(data.indices["val"]), 32)
    with torch.no_grad():
        ref = direct_model(study["weights"]).encode_image(
            (torch.from_numpy(data.split("val")[0]).float() / 255 - model.mean) / model.std
        )
    np.testing.assert_allclose(emb, ref.numpy(), rtol=1e-4, atol=1e-4)


# --- sources and splits -------------------------------------------------------------------------------
def test_sources_decode_the_same_images_identically(study):
    """The image folder and the saved `datasets` copy of the same pictures give the same uint8 arrays."""
    tmp = study["tmp"]
    classes = ["red", "green", "blue"]
    folder = write_image_folder(tmp / "same_folder", classes, 5, 3, 42)
    disk = write_hf_disk(tmp / "same_disk", classes, 5, 3, 42)
    a = stages.prepare(
        "a",
        {"source": "image_folder", "path": str(folder), "image_size": IMAGE_SIZE, "classnames": classes},
        SPLIT,
        tmp / "same" / "a",
    )
    spec = {"source": "hf_images", "hub_id": str(disk), "image_size": IMAGE_SIZE}
    stages.download("b", spec, tmp / "same" / "dl")
    b = stages.prepare("b", spec, SPLIT, tmp / "same" / "b", tmp / "same" / "dl")
    assert a["classes"] == b["classes"] == classes
    da, db = load_prepared(tmp / "same" / "a"), load_prepared(tmp / "same" / "b")
    # folder order is by class folder name (blue, green, red), hub order by label: compare per label
    for split in ("train", "val", "test"):
        xa, ya = da.split(split)
        xb, yb = db.split(split)
        assert da.x.dtype == np.uint8 and xa.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert sorted(ya.tolist()) == sorted(yb.tolist())
    assert np.array_equal(np.sort(da.x.reshape(len(da.x), -1), axis=0), np.sort(db.x.reshape(len(db.x), -1), axis=0))


def test_val_is_carved_from_train_seeded_capped_and_saved(study, tmp_path):
    spec = study["specs"]["folder"]
    info = io.read_json(study["dirs"]["folder"] / "splits.json")
    n_train_given = 3 * 12
    assert info["sizes"]["val"] == round(0.2 * n_train_given) and info["sizes"]["test"] == 3 * 6
    idx = {k: set(v) for k, v in info["indices"].items()}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"])
    assert idx["train"] | idx["val"] == set(range(n_train_given))  # val comes from the given train split only
    capped = stages.prepare("c", spec, {**SPLIT, "val_cap": 4}, tmp_path / "c")
    again = stages.prepare("c", spec, {**SPLIT, "val_cap": 4}, tmp_path / "c2")
    other = stages.prepare("c", spec, {**SPLIT, "val_cap": 4, "seed": 1}, tmp_path / "c3")
    assert capped["sizes"]["val"] == 4 and capped["indices"] == again["indices"]
    assert capped["indices"]["val"] != other["indices"]["val"]


def test_hub_source_errors_name_the_fix(study, tmp_path):
    from mergemix.data.images import download_hf

    hub = study["specs"]["disk"]["hub_id"]
    with pytest.raises(ValueError, match="set image_column"):
        download_hf({"source": "hf_images", "hub_id": hub, "image_column": "img"}, tmp_path / "x")
    spec = {"source": "hf_images", "hub_id": hub, "image_size": IMAGE_SIZE, "classnames": "mnist"}
    stages.download("d", spec, tmp_path / "dl")
    with pytest.raises(ValueError, match="10 class names given but the data has 4 classes"):
        stages.prepare("d", spec, SPLIT, tmp_path / "d", tmp_path / "dl")
    with pytest.raises(ValueError, match="unknown template set"):
        stages.prepare("d", {**spec, "classnames": None, "templates": "nope"}, SPLIT, tmp_path / "d", tmp_path / "dl")


def test_paper_datasets_have_class_names_and_templates():
    # the class counts of the datasets as published
    counts = {
        "cars": 196,
        "dtd": 47,
        "eurosat": 10,
        "gtsrb": 43,
        "mnist": 10,
        "resisc45": 45,
        "sun397": 397,
        "svhn": 10,
    }
    assert {k: len(CLASSNAMES[k]) for k in counts} == counts
    for name in counts:
        names = CLASSNAMES[name]
        assert len(set(names)) == len(names) and all(isinstance(c, str) and c.strip() == c and c for c in names)
        assert TEMPLATES[name] and all(t.count("{}") == 1 for t in TEMPLATES[name])
    assert CLASSNAMES["mnist"] == CLASSNAMES["svhn"] == [str(i) for i in range(10)]
    assert len(set(TEMPLATES["resisc45"])) == 18
    with pytest.raises(ValueError, match="carries no class names"):
        resolve_classnames("from_data", None)
    # the shipped names against a label feature that spells them its own way, in the same order
    data = [c.replace(" ", "_").title() for c in CLASSNAMES["sun397"]]
    assert resolve_classnames("sun397", data) == CLASSNAMES["sun397"]
    data[3], data[7] = data[7], data[3]
    with pytest.raises(ValueError, match=r"another order \(label 3 is 'Anechoic_Chamber' in the data"):
        resolve_classnames("sun397", data)


def test_study_config_is_the_papers_design():
    from conftest import ROOT
    from mergemix.config import candidates_of, load_yaml, targets_of, validate_config
    from mergemix.subsets import all_subsets, subset_id

    cfg = validate_config(load_yaml(ROOT / "config" / "clip_vit_b32.yaml"))
    assert cfg["backend"] == {"name": "clip", "params": {"model": "ViT-B-32-quickgelu", "pretrained": "openai"}}
    names = sorted(cfg["datasets"])
    assert names == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    for n, spec in cfg["datasets"].items():
        assert spec["source"] == "hf_images" and spec["hub_id"] and spec["revision"] and spec["templates"] == n
    targets = targets_of(cfg)
    assert targets == list(cfg["datasets"]) and all(len(candidates_of(cfg, t)) == 7 for t in targets)
    mixtures = {subset_id(s) for t in targets for s in all_subsets(candidates_of(cfg, t))}
    assert len(mixtures) == 2**8 - 2 and sum(1 for m in mixtures if "+" in m) == 254 - 8
    ft = cfg["finetune"]
    assert (
        ft["epochs"],
        ft["batch_size"],
        ft["lr"],
        ft["optimizer"],
        ft["weight_decay"],
        ft["schedule"],
        ft["grad_clip"],
    ) == (10, 128, 1e-5, "adamw", 0.1, "cosine", 1.0)
    assert ft["warmup_frac"] > 0 and cfg["mixture"]["enabled"] and cfg["resources"]["gpu"] == 1


def test_image_reader_reads_the_same_rows_as_indexing(study):
    from mergemix.backends.clip import ImageReader

    x = load_prepared(study["dirs"]["disk"]).x
    assert isinstance(x, np.memmap)
    rows = np.array([5, 0, 37, 5, 12, len(x) - 1])
    expected = np.asarray(x[rows])
    for workers in (0, 3):
        got = ImageReader(workers)(x, rows)
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
    view = x[2:]  # a view of the map starts elsewhere in the file: plain indexing is used
    assert np.array_equal(ImageReader(3)(view, rows[:-1]), np.asarray(view[rows[:-1]]))


def test_openai_weights_need_the_quickgelu_architecture(monkeypatch):
    """Checked before any download: plain ViT-B-32 would run OpenAI's QuickGELU weights with GELU."""
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access"))
    with pytest.raises(ValueError, match="set model: ViT-B-32-quickgelu"):
        get_backend({"name": "clip", "params": {"model": "ViT-B-32"}}).fetch_pretrained("/nonexistent/m.safetensors")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        get_backend({"name": "clip", "params": {"pretrained": "nope"}}).fetch_pretrained("/nonexistent/m.safetensors")
    get_backend({"name": "clip", "params": {}})._check_activation()  # the default is consistent


def test_download_keeps_one_local_copy_per_split(study):
    for name, rows in (("parquet", {"train": 36, "test": 18}), ("disk", {"train": 48, "test": 24})):
        out = study["tmp"] / "downloads" / name
        assert io.read_json(out / "download.json")["info"]["rows"] == rows
        assert sorted(p.name for p in out.iterdir()) == ["download.json", "test", "train"]  # no leftover cache


def test_hub_source_label_kinds(tmp_path):
    """String labels become sorted classes; bare integer labels need class names from the spec."""
    import datasets

    images, labels = make_images(["red", "blue"], 4, 3)
    for name, column, extra, expect in (
        ("strings", [["red", "blue"][i] for i in labels], {}, ["blue", "red"]),
        ("ints", labels, {"classnames": ["warm", "cold"]}, ["warm", "cold"]),
    ):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": column})}).save_to_disk(
            str(tmp_path / name)
        )
        spec = {
            "source": "hf_images",
            "hub_id": str(tmp_path / name),
            "image_size": IMAGE_SIZE,
            "splits": {"train": "train"},
            **extra,
        }
        stages.download(name, spec, tmp_path / "dl" / name)
        info = stages.prepare(name, spec, SPLIT, tmp_path / "data" / name, tmp_path / "dl" / name)
        assert info["classes"] == expect
        d = load_prepared(tmp_path / "data" / name)
        assert sum(info["sizes"].values()) == 8 and set(d.y.tolist()) == {0, 1}
        if name == "strings":
            assert [["blue", "red"][v] for v in d.y] == column
    with pytest.raises(ValueError, match="carries no class names"):
        spec = {
            "source": "hf_images",
            "hub_id": str(tmp_path / "ints"),
            "image_size": IMAGE_SIZE,
            "splits": {"train": "train"},
        }
        stages.prepare("ints", spec, SPLIT, tmp_path / "data" / "x", tmp_path / "dl" / "ints")
    with pytest.raises(ValueError, match="fall outside 0..0"):
        stages.prepare(
            "ints", {**spec, "classnames": ["only"]}, SPLIT, tmp_path / "data" / "y", tmp_path / "dl" / "ints"
        )


def test_hub_download_passes_id_revision_config_and_records_the_commit(study, tmp_path, monkeypatch):
    """The remote branch of the download step, with the hub stood in by the local saved dataset."""
    import datasets
    import huggingface_hub

    local = datasets.load_from_disk(study["specs"]["disk"]["hub_id"])
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, cache_dir=None, **kw):
        calls.append((path, name, split, revision))
        assert cache_dir and str(tmp_path) in cache_dir  # the cache stays inside the download folder
        return local[split]

    class Info:
        sha = "0123abcd" * 5

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo, revision=None: Info())
    spec = {
        "source": "hf_images",
        "hub_id": "some-org/colours",
        "revision": "v1.0",
        "config": "plain",
        "splits": {"train": "training", "test": "test"},
        "image_size": IMAGE_SIZE,
    }
    local = datasets.DatasetDict({"training": local["train"], "test": local["test"]})
    info = stages.download("colours", spec, tmp_path / "dl")
    assert calls == [("some-org/colours", "plain", "training", "v1.0"), ("some-org/colours", "plain", "test", "v1.0")]
    assert info["resolved_revision"] == Info.sha and info["rows"] == {"train": 48, "test": 24}
    prepared = stages.prepare("colours", spec, SPLIT, tmp_path / "data", tmp_path / "dl")
    assert prepared["classes"] == ["red", "green", "blue", "yellow"] and prepared["sizes"]["test"] == 24
