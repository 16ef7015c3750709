"""Given fine-tunes of the clip backend (``mergemix.given.clip``), offline with tiny models: open_clip
state dicts (safetensors, weights-only .pt, hub-style folders) and transformers CLIP folders written by
``save_pretrained``, converted to the backend's ``visual.*`` keys; the conversion checked exactly and
by the forward pass of both libraries; refusals of other architectures, other bases and other files."""

import json
import re
import shutil

import pytest
import torch

from clip_fixtures import TINY_CONFIG, TINY_NAME, backend_spec, write_tiny_weights
from mergemix import io, stages
from mergemix.backends import get_backend
from mergemix.given import GivenModelError, import_model
from mergemix.given import clip as given_clip

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

# a second tiny architecture as OpenAI's CLIP is built: QuickGELU, 4 heads of width 16
QG_NAME = "mergemix-tiny-given-qg"
QG_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": dict(TINY_CONFIG["text_cfg"]),
}
HF_ACT = {"tiny": "gelu", "qg": "quick_gelu"}  # open_clip's nn.GELU is transformers' exact "gelu"
HEADS = {"tiny": 1, "qg": 4}
LAYERS = 2


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def register(folder, name, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")


def random_clip(folder, name, cfg, seed):
    register(folder, name, cfg)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)


def noisy(state, seed, scale=0.002):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Per architecture: the study's backend spec, the fetched pre-trained model, its visual state and
    a "fine-tuned" visual state (pre-trained + noise)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("given_clip")
    out = {}
    for key in ("tiny", "qg"):
        if key == "tiny":
            weights = write_tiny_weights(tmp / key / "weights.pt")
            spec = backend_spec(weights)
        else:
            weights = tmp / key / "weights.pt"
            torch.save(random_clip(tmp / key, QG_NAME, QG_CONFIG, seed=0).state_dict(), weights)
            spec = backend_spec(weights)
            spec["params"].update(model=QG_NAME, model_config=QG_CONFIG)
        pretrained = tmp / key / "pretrained" / "model.safetensors"
        stages.fetch_pretrained(spec, pretrained)
        backend = get_backend(spec)
        model = backend.load_pretrained(pretrained)
        ref = {k: v.detach().clone() for k, v in backend.merge_params(model).items()}
        out[key] = {
            "spec": spec,
            "pretrained": pretrained,
            "ref": ref,
            "ft": noisy(ref, seed=1),
            "full": io.load_model(pretrained)[0],
            "name": spec["params"]["model"],
        }
    out["tmp"] = tmp
    yield out
    mp.undo()


def imported(study, path, tmp_path, fmt=None, **extra):
    spec = {"path": str(path), **extra}
    if fmt:
        spec["format"] = fmt
    out = tmp_path / "out" / "somedataset" / "model.safetensors"
    import_model(study["spec"], study["pretrained"], spec, "somedataset", out)
    return io.load_model(out)


def assert_state(state, expected, exact=True):
    assert set(state) == set(expected)
    for k, v in expected.items():
        if exact:
            assert torch.equal(state[k], v), k
        else:
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)


def assert_given(manifest, fmt, path, base=None):
    given = manifest["given"]
    assert manifest["kind"] == "finetuned" and manifest["hyperparameters"] == {"given": True}
    assert manifest["data"] == [{"name": "somedataset", "sha256": None}]
    assert given["format"] == fmt and given["base"] == base
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    assert given["files"] == {str(p.relative_to(path)) if path.is_dir() else p.name: io.sha256_file(p) for p in files}
    assert 0 < given["relative_distance"] < 0.1
    return given


# --- transformers' CLIP from open_clip weights (the inverse of the conversion under test) ---------------------
def open_clip_to_hf(visual, layers=LAYERS):
    """open_clip ``visual.*`` tensors as a transformers CLIP vision tower's (keys relative to vision_model)."""
    v = {k[len("visual.") :]: t for k, t in visual.items()}
    hf = {
        "embeddings.class_embedding": v["class_embedding"],
        "embeddings.patch_embedding.weight": v["conv1.weight"],
        "embeddings.position_embedding.weight": v["positional_embedding"],
        "pre_layrnorm.weight": v["ln_pre.weight"],
        "pre_layrnorm.bias": v["ln_pre.bias"],
        "post_layernorm.weight": v["ln_post.weight"],
        "post_layernorm.bias": v["ln_post.bias"],
    }
    for i in range(layers):
        p, h = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, val = v[p + f"attn.in_proj_{kind}"].chunk(3, dim=0)
            hf.update(
                {
                    h + f"self_attn.q_proj.{kind}": q,
                    h + f"self_attn.k_proj.{kind}": k,
                    h + f"self_attn.v_proj.{kind}": val,
                }
            )
            for ours, theirs in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                hf[h + f"{theirs}.{kind}"] = v[p + f"{ours}.{kind}"]
    return {k: t.clone().contiguous() for k, t in hf.items()}


def hf_vision_config(key, **over):
    kw = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS[key],
        image_size=16,
        patch_size=8,
        hidden_act=HF_ACT[key],
        layer_norm_eps=1e-5,
        projection_dim=32,
    )
    kw.update(over)
    return transformers.CLIPVisionConfig(**kw)


def tower(model):
    """The vision transformer of a transformers CLIP model (a CLIPVisionModel is one in transformers >= 5)."""
    return getattr(model, "vision_model", model)


def write_hf(folder, visual, key, kind="vision", name_or_path=None, bin_only=False, **over):
    """A transformers CLIP model holding ``visual`` written with save_pretrained: ``vision``
    (CLIPVisionModel), ``projection`` (CLIPVisionModelWithProjection) or ``clip`` (CLIPModel)."""
    vcfg = hf_vision_config(key, **over)
    if kind == "vision":
        model = transformers.CLIPVisionModel(vcfg)
    elif kind == "projection":
        model = transformers.CLIPVisionModelWithProjection(vcfg)
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        model = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=vcfg.to_dict(), text_config=text, projection_dim=32)
        )
    missing, unexpected = tower(model).load_state_dict(open_clip_to_hf(visual), strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}
    if kind != "vision":
        with torch.no_grad():
            model.visual_projection.weight.copy_(visual["visual.proj"].T)
    model.save_pretrained(folder)
    if bin_only:  # an older transformers' pytorch_model.bin (a plain state dict: weights_only reads it)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if name_or_path:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["_name_or_path"] = name_or_path
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder, model.eval()


# --- format open_clip ---------------------------------------------------------------------------------------
def test_open_clip_safetensors_full_clip_state(studies, tmp_path):
    s = studies["tiny"]
    full = {**s["full"], **s["ft"]}  # the whole CLIP model, image encoder fine-tuned
    p = tmp_path / "finetuned.safetensors"
    save_file(full, str(p))
    assert given_clip.detect(p) == "open_clip"
    state, manifest = imported(s, p, tmp_path)  # format: auto
    assert_state(state, s["ft"])
    given = assert_given(manifest, "open_clip", p)
    assert given["checkpoint"] == p.name and given["architecture"]["width"] == 64
    assert manifest["pretrained_sha256"] == io.read_json(io.manifest_path(s["pretrained"]))["sha256"]


@pytest.mark.parametrize("layout", ["open_clip_training_checkpoint", "visual_only", "encoder_state_dict", "legacy"])
def test_open_clip_pt_weights_only(studies, tmp_path, layout):
    """A .pt read with torch.load(weights_only=True): open_clip's training checkpoint (nested under
    state_dict, DDP's module. prefix), a plain visual.* dict, the image encoder's own state dict, and
    torch's legacy (non-zip) serialization, which cannot be memory-mapped."""
    s = studies["tiny"]
    if layout == "open_clip_training_checkpoint":
        obj = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in {**s["full"], **s["ft"]}.items()}}
    elif layout == "visual_only":
        obj = dict(s["ft"])
    else:
        obj = {k[len("visual.") :]: v for k, v in s["ft"].items()}
    p = tmp_path / "finetuned.pt"
    torch.save(obj, p, _use_new_zipfile_serialization=layout != "legacy")
    state, manifest = imported(s, p, tmp_path, fmt="open_clip")
    assert_state(state, s["ft"])
    assert_given(manifest, "open_clip", p)


def test_open_clip_hub_folder(studies, tmp_path):
    """A hub-style folder with the same weights as .bin and .safetensors: detected, the safetensors read."""
    s = studies["tiny"]
    folder = tmp_path / "hub"
    folder.mkdir()
    full = {**s["full"], **s["ft"]}
    torch.save(full, folder / "open_clip_pytorch_model.bin")
    save_file(full, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    assert given_clip.detect(folder) == "open_clip"
    state, manifest = imported(s, folder, tmp_path)
    assert_state(state, s["ft"])
    assert assert_given(manifest, "open_clip", folder)["checkpoint"] == "open_clip_model.safetensors"
    (folder / "open_clip_model.safetensors").unlink()
    assert given_clip.detect(folder) == "open_clip"
    state, _ = imported(s, folder, tmp_path)
    assert_state(state, s["ft"])


def test_open_clip_fp16_cast_to_pretrained_dtype(studies, tmp_path):
    s = studies["tiny"]
    p = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in s["ft"].items()}, str(p))
    state, manifest = imported(s, p, tmp_path)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert_state(state, {k: v.half().float() for k, v in s["ft"].items()})
    assert manifest["given"]["cast_from"] == ["float16"]


# --- format clip_hf -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vision", "projection", "clip", "clip_bin"])
def test_clip_hf_folders(studies, tmp_path, kind):
    s = studies["qg"]
    ft = dict(s["ft"])
    if kind == "vision":  # a CLIPVisionModel has no projection: fine-tuning it leaves the pre-trained one
        ft["visual.proj"] = s["ref"]["visual.proj"]
    folder, _ = write_hf(
        tmp_path / "hf",
        ft,
        "qg",
        kind="clip" if kind == "clip_bin" else kind,
        name_or_path="someorg/clip-tiny-finetuned",
        bin_only=kind == "clip_bin",
    )
    if kind == "projection":  # an image processor normalising otherwise than the study: a warning, recorded
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
        )
    assert given_clip.detect(folder) == "clip_hf"
    state, manifest = imported(s, folder, tmp_path)  # format: auto
    assert_state(state, ft)
    given = assert_given(manifest, "clip_hf", folder, base="someorg/clip-tiny-finetuned")
    assert given.get("proj_from_pretrained", False) == (kind == "vision")
    assert given["architecture"]["hidden_act"] == "quick_gelu" and given["architecture"]["num_attention_heads"] == 4
    assert given["checkpoint"] == ["pytorch_model.bin" if kind == "clip_bin" else "model.safetensors"]
    if kind in ("clip", "clip_bin"):
        assert given["hf_architectures"] == ["CLIPModel"]
    assert ("preprocessor_differs" in given) == (kind == "projection")


@pytest.mark.parametrize("key", ["qg", "tiny"])
def test_clip_hf_conversion_matches_open_clip_forward(studies, tmp_path, key):
    """open_clip tower -> transformers CLIPVisionModel (save_pretrained) -> given.clip.load: the tensors
    come back exactly, and transformers' forward (pooled output @ proj) equals open_clip's."""
    s = studies[key]
    backend = get_backend(s["spec"])
    model = backend.load_pretrained(s["pretrained"])
    visual = {**s["ft"], "visual.proj": s["ref"]["visual.proj"]}
    folder, _ = write_hf(tmp_path / "hf", visual, key)
    pre = io.read_json(io.manifest_path(s["pretrained"]))
    loaded = given_clip.load(folder, "clip_hf", backend, model, pre)
    assert_state(loaded.state, visual)
    assert loaded.info["proj_from_pretrained"] is True

    hf = transformers.CLIPVisionModel.from_pretrained(str(folder)).eval()
    assert hf.config.hidden_act == HF_ACT[key]
    model.visual.load_state_dict({k[len("visual.") :]: v for k, v in loaded.state.items()}, strict=True)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours = model.visual(x)
        theirs = hf(pixel_values=x).pooler_output @ loaded.state["visual.proj"]
        other_act = hf_vision_config(key, hidden_act="gelu" if key == "qg" else "quick_gelu")
        wrong = transformers.CLIPVisionModel(other_act).eval()
        tower(wrong).load_state_dict(tower(hf).state_dict())
        wrong_out = wrong(pixel_values=x).pooler_output @ loaded.state["visual.proj"]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrong_out, ours, atol=1e-4)  # the check would notice another activation


# --- refusals ------------------------------------------------------------------------------------------------
def expect_refusal(study, path, tmp_path, *fragments, fmt=None):
    with pytest.raises(GivenModelError) as e:
        imported(study, path, tmp_path, fmt=fmt)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))
    return msg


def test_clip_hf_other_patch_size_refused(studies, tmp_path):
    s = studies["qg"]
    other = random_clip(
        studies["tmp"] / "p4",
        "mergemix-tiny-given-p4",
        {**QG_CONFIG, "vision_cfg": {**QG_CONFIG["vision_cfg"], "patch_size": 4}},
        seed=0,
    )
    visual = {f"visual.{k}": v.detach() for k, v in other.visual.named_parameters()}
    folder, _ = write_hf(tmp_path / "hf", visual, "qg", patch_size=4)
    expect_refusal(s, folder, tmp_path, "config.json: patch_size 4 but the study's", QG_NAME, "has 8")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_size", 32, "hidden_size 32 but the study's {name} has 64"),
        ("num_hidden_layers", 3, "num_hidden_layers 3 but the study's {name} has 2"),
        ("num_attention_heads", 2, "num_attention_heads 2 but the study's {name} has 4"),
        ("intermediate_size", 128, "intermediate_size 128 but the study's {name} has 256"),
        ("image_size", 32, "image_size 32 but the study's {name} has 16"),
        ("hidden_act", "gelu", "hidden_act gelu but the study's {name} has quick_gelu"),
        ("layer_norm_eps", 1e-6, "layer_norm_eps 1e-06 but the study's {name} has 1e-05"),
    ],
)
def test_clip_hf_config_mismatch_refused(studies, tmp_path, field, value, message):
    s = studies["qg"]
    folder, _ = write_hf(tmp_path / "hf", s["ft"], "qg", kind="clip")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"][field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_refusal(s, folder, tmp_path, "config.json: vision_config." + message.format(name=QG_NAME))


def test_clip_hf_projection_dim_and_study_activation(studies, tmp_path):
    """A CLIPModel with another projection width; a quick_gelu checkpoint for a GELU study."""
    s = studies["qg"]
    folder, _ = write_hf(tmp_path / "hf", s["ft"], "qg", kind="clip")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["projection_dim"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_refusal(s, folder, tmp_path, f"config.json: projection_dim 16 but the study's {QG_NAME} has 32")
    t = studies["tiny"]
    folder, _ = write_hf(tmp_path / "hf1", t["ft"], "qg")  # 4 heads and QuickGELU for the 1-head GELU study
    expect_refusal(t, folder, tmp_path, f"num_attention_heads 4 but the study's {TINY_NAME} has 1")


def test_open_clip_other_width_refused(studies, tmp_path):
    s = studies["tiny"]
    narrow = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "width": 32, "head_width": 16}}
    other = random_clip(studies["tmp"] / "w32", "mergemix-tiny-given-w32", narrow, seed=0)
    p = tmp_path / "w32.safetensors"
    save_file({k: v.detach().contiguous() for k, v in other.state_dict().items()}, str(p))
    expect_refusal(s, p, tmp_path, f"image encoder width 32 but the study's {TINY_NAME} has 64")
    deeper = random_clip(
        studies["tmp"] / "l3",
        "mergemix-tiny-given-l3",
        {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 3}},
        seed=0,
    )
    p = tmp_path / "l3.safetensors"
    save_file({k: v.detach().contiguous() for k, v in deeper.state_dict().items()}, str(p))
    expect_refusal(s, p, tmp_path, f"image encoder layers 3 but the study's {TINY_NAME} has 2")


@pytest.mark.parametrize("fmt", ["open_clip", "clip_hf"])
def test_other_base_refused(studies, tmp_path, fmt):
    """Weights of the same architecture from another pre-training run (here: another random init)."""
    key = "tiny" if fmt == "open_clip" else "qg"
    s = studies[key]
    name, cfg = (TINY_NAME, TINY_CONFIG) if key == "tiny" else (QG_NAME, QG_CONFIG)
    other = random_clip(studies["tmp"] / "other", name, cfg, seed=123)
    visual = {f"visual.{k}": v.detach().clone() for k, v in other.visual.named_parameters()}
    if fmt == "open_clip":
        path = tmp_path / "other.safetensors"
        save_file(visual, str(path))
    else:
        path, _ = write_hf(tmp_path / "hf", visual, key, kind="clip")
    msg = expect_refusal(s, path, tmp_path, "fine-tunes are within 0.5)", "derives from another base")
    dist = float(re.search(r"is (\d+\.\d+) away", msg).group(1))
    assert dist > 0.5


def test_folder_of_neither_format_refused(studies, tmp_path):
    s = studies["tiny"]
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "README.md").write_text("my model\n")
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    assert given_clip.detect(folder) is None
    expect_refusal(
        s, folder, tmp_path, str(folder), "not a model format the 'clip' backend reads", "mergemix, open_clip, clip_hf"
    )
    # named explicitly, each format says what it misses
    expect_refusal(
        s, folder, tmp_path, "model_type 'siglip_vision_model' is not a transformers CLIP model", fmt="clip_hf"
    )
    expect_refusal(s, folder, tmp_path, "no checkpoint file with visual.* keys", fmt="open_clip")
    expect_refusal(s, folder / "weights.safetensors", tmp_path, "no visual.* tensors", "['encoder']", fmt="open_clip")


def test_pickled_objects_never_unpickled(studies, tmp_path, monkeypatch):
    """A checkpoint holding pickled objects (a whole module) is refused by torch.load(weights_only=True),
    as a .pt of format open_clip and as the pytorch_model.bin of a transformers folder."""
    s = studies["qg"]
    p = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), p)
    assert given_clip.detect(p) is None
    expect_refusal(s, p, tmp_path, str(p), "weights_only=True", "never unpickles", fmt="open_clip")
    folder, _ = write_hf(tmp_path / "hf", s["ft"], "qg", kind="clip", bin_only=True)
    torch.save({"vision_model": torch.nn.Linear(2, 2)}, folder / "pytorch_model.bin")
    expect_refusal(s, folder, tmp_path, "pytorch_model.bin", "weights_only=True")


def test_two_open_clip_files_in_a_folder(studies, tmp_path):
    s = studies["tiny"]
    folder = tmp_path / "two"
    folder.mkdir()
    save_file(dict(s["ft"]), str(folder / "a.safetensors"))
    save_file(dict(s["ref"]), str(folder / "b.safetensors"))
    assert given_clip.detect(folder) is None
    expect_refusal(
        s, folder, tmp_path, "2 checkpoint files with visual.* keys (a.safetensors, b.safetensors)", fmt="open_clip"
    )
    shutil.rmtree(folder)
