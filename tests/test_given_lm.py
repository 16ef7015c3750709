"""Given models of the causal_lm backend (``mergemix.given.lm``): peft adapters (IA3, LoRA) saved by
peft's own ``save_pretrained`` and full weights saved by transformers' ``save_pretrained``, on the
tiny local Llama (nothing is downloaded)."""

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import lm_tiny  # noqa: E402
from lm_tiny import base_dir, offline  # noqa: E402,F401 (shared fixtures)
from mergemix import io  # noqa: E402
from mergemix.backends import get_backend  # noqa: E402
from mergemix.backends.causal_lm import CausalLMBackend  # noqa: E402
from mergemix.given import GivenModelError, import_model  # noqa: E402
from mergemix.given import lm as given_lm  # noqa: E402

SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
LORA = {"adapter": "lora", "lora_r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]}
FULL = {"adapter": "none"}
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45], [5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module", autouse=True)
def _offline(offline):
    yield


def spec(base_dir, **params):
    return {"name": "causal_lm", "params": {"model": str(base_dir), "eval_batch_size": 4, **params}}


def backend(base_dir, **params):
    return get_backend(spec(base_dir, **params), threads=1, device="cpu")


@pytest.fixture(scope="module")
def pre(base_dir, tmp_path_factory):
    """The study's pre-trained model (theta_0) per backend configuration."""
    root = tmp_path_factory.mktemp("pre")
    out = {}
    for name, params in (("ia3", {}), ("lora", LORA), ("full", FULL)):
        out[name] = root / name / "model.safetensors"
        backend(base_dir, **params).fetch_pretrained(out[name])
    return out


def base_model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


def user_adapter(base_dir, folder, seed=123, scale=0.3, **params):
    """A user's adapter: peft's get_peft_model with the backend's adapter config on the base model,
    initialised with the user's seed, moved as a little training would, saved by peft."""
    from peft import get_peft_model

    be = backend(base_dir, **params)
    torch.manual_seed(seed)
    pm = get_peft_model(base_model(base_dir), be.peft_config())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "ia3_l" in k:
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
            elif "lora_B" in k:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            else:  # lora_A: the user's init, moved a little
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(str(folder))
    return pm


@pytest.fixture(scope="module")
def ia3_folder(base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user") / "ia3"
    user_adapter(base_dir, folder)
    return folder


@pytest.fixture(scope="module")
def lora_folder(base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user") / "lora"
    user_adapter(base_dir, folder, **LORA)
    return folder


def edited_copy(folder, dest, **changes):
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def peft_reloaded(base_dir, folder):
    """The user's adapter as peft itself loads it onto the base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(base_dir), str(folder)).eval()


# --- detection -----------------------------------------------------------------------------------
def test_detect(base_dir, ia3_folder, tmp_path):
    assert given_lm.detect(ia3_folder) == "peft"
    assert given_lm.detect(base_dir) == "causal_lm_hf"  # a save_pretrained LlamaForCausalLM folder
    assert given_lm.detect(ia3_folder / "adapter_model.safetensors") is None
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert given_lm.detect(tmp_path / "cfg") is None  # no weights
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"]}))
    assert given_lm.detect(tmp_path / "cfg") is None  # not a causal LM


# --- peft IA3 --------------------------------------------------------------------------------------
def test_ia3_adapter_is_imported_with_its_values(base_dir, pre, ia3_folder, tmp_path):
    out = tmp_path / "ft" / "copy" / "model.safetensors"
    info = import_model(spec(base_dir), pre["ia3"], {"path": str(ia3_folder)}, "copy", out)  # format: auto
    state, manifest = io.load_model(out)
    ref = peft_reloaded(base_dir, ia3_folder)
    be = backend(base_dir)
    live = be.merge_params(be.load_pretrained(pre["ia3"]))
    assert set(state) == set(live) and len(state) == 6
    params = dict(ref.named_parameters())
    for k, v in state.items():
        assert v.dtype == live[k].dtype and torch.equal(v, params[k].detach()), k
        assert not torch.equal(v, torch.ones_like(v))
    g = manifest["given"]
    assert info["given"] == g and g["format"] == "peft" and g["base"] == str(base_dir)
    assert set(g["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert g["files"]["adapter_model.safetensors"] == io.sha256_file(ia3_folder / "adapter_model.safetensors")
    assert g["peft_type"] == "IA3" and g["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert g["feedforward_modules"] == ["down_proj"]
    # IA3's theta_0 is all ones: the distance is ||l - 1|| / ||1||, about the perturbation's 0.3
    ones = {k: torch.ones_like(v) for k, v in state.items()}
    expected = (sum(((v - 1) ** 2).sum() for v in state.values()) / sum(o.sum() for o in ones.values())) ** 0.5
    assert g["relative_distance"] == pytest.approx(float(expected)) and 0.1 < g["relative_distance"] < 0.5
    assert manifest["hyperparameters"] == {"given": True} and manifest["data"] == [{"name": "copy", "sha256": None}]
    # a large move is refused by the distance check (max_distance), a raised limit accepts it
    with pytest.raises(GivenModelError, match=r"away from the study's pre-trained model.*max_distance"):
        import_model(
            spec(base_dir),
            pre["ia3"],
            {"path": str(ia3_folder), "max_distance": 0.1},
            "copy",
            tmp_path / "x" / "model.safetensors",
        )


def test_imported_ia3_evaluates_like_peft_itself(base_dir, pre, ia3_folder, tmp_path):
    out = tmp_path / "ft" / "model.safetensors"
    import_model(spec(base_dir), pre["ia3"], {"path": str(ia3_folder), "format": "peft"}, "copy", out)
    state, _ = io.load_model(out)
    be = backend(base_dir)
    model = be.load_pretrained(pre["ia3"])
    theta0 = {k: v.clone() for k, v in be.state_to_save(model).items()}
    target = lm_tiny.adapter_target(be, model, tmp_path / "target", SPLIT)  # references: theta_0's completions
    score0 = be.evaluate(model, target, "test")
    be.load_state(model, state)
    ref = peft_reloaded(base_dir, ia3_folder)
    with torch.no_grad():
        ours, theirs = model(input_ids=IDS).logits, ref(input_ids=IDS).logits
        base_logits = base_model(base_dir)(input_ids=IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter matters
    score = be.evaluate(ref, target, "test")
    assert be.evaluate(model, target, "test") == score
    # batched (StackedAdapters) scoring of the imported and the pre-trained adapter
    assert be.evaluate_many(model, target, "test", [state, theta0]) == [score, score0]


# --- peft LoRA -------------------------------------------------------------------------------------
def test_lora_adapter_from_another_seed_is_exact_in_merge_space(base_dir, pre, lora_folder, tmp_path):
    out = tmp_path / "ft" / "model.safetensors"
    import_model(spec(base_dir, **LORA), pre["lora"], {"path": str(lora_folder)}, "rev", out)
    state, manifest = io.load_model(out)
    be = backend(base_dir, **LORA)
    theta0 = io.load_model(pre["lora"])[0]
    a_keys = [k for k in state if k.endswith("lora_A.default.weight")]
    assert len(a_keys) == 6 and not any(torch.allclose(state[k], theta0[k], atol=1e-2) for k in a_keys)  # foreign A
    ref = peft_reloaded(base_dir, lora_folder)
    dense = be.to_merge_space(state)
    assert len(dense) == 6
    for k, d in dense.items():
        layer = ref.get_submodule(k[: -len(".mergemix_delta")])
        assert torch.allclose(d, layer.get_delta_weight("default"), atol=1e-6), k
        assert d.abs().max() > 1e-3
    g = manifest["given"]
    assert g["format"] == "peft" and g["peft_type"] == "LORA" and g["r"] == 2 and g["lora_alpha"] == 3
    assert g["relative_distance"] is None  # theta_0's updates are zero (B = 0): no distance check
    assert g["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    # the imported factors, loaded into the backend's live model, give peft's outputs
    model = be.load_pretrained(pre["lora"])
    be.load_state(model, state)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, ref(input_ids=IDS).logits, atol=1e-5)


def test_lora_factors_mode_refuses_a_foreign_init(base_dir, pre, lora_folder, tmp_path):
    factors = {**LORA, "lora_merge": "factors"}
    with pytest.raises(GivenModelError, match=r"A factors are .* away.*use lora_merge: products"):
        import_model(
            spec(base_dir, **factors),
            pre["lora"],
            {"path": str(lora_folder)},
            "rev",
            tmp_path / "a" / "model.safetensors",
        )
    # an adapter trained from the study's own pre-trained adapter (same A init) is accepted
    be = backend(base_dir, **factors)
    model = be.load_pretrained(pre["lora"])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in be.merge_params(model).items():
            p.add_((0.01 if "lora_A" in k else 0.2) * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(tmp_path / "own"))
    assert "/../" in json.loads((tmp_path / "own" / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = tmp_path / "b" / "model.safetensors"
    import_model(spec(base_dir, **factors), pre["lora"], {"path": str(tmp_path / "own")}, "rev", out)
    state, manifest = io.load_model(out)
    for k, p in be.merge_params(model).items():
        assert torch.equal(state[k], p.detach())
    g = manifest["given"]
    # the distance covers the A factors only: theta_0's B factors are zero (no scale to compare with)
    assert 0 < g["lora_a_distance"] < 0.3 and g["relative_distance"] == pytest.approx(g["lora_a_distance"])


def test_pickled_adapter_bin_only_with_weights_only(base_dir, pre, ia3_folder, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(ia3_folder / "adapter_model.safetensors"))
    ok = tmp_path / "bin_ok"
    ok.mkdir()
    shutil.copy(ia3_folder / "adapter_config.json", ok)
    torch.save(tensors, ok / "adapter_model.bin")
    out = tmp_path / "ok" / "model.safetensors"
    import_model(spec(base_dir), pre["ia3"], {"path": str(ok), "format": "peft"}, "copy", out)
    state, _ = io.load_model(out)
    assert all(torch.equal(state[k + ".default"], v) for k, v in tensors.items())
    bad = tmp_path / "bin_bad"
    bad.mkdir()
    shutil.copy(ia3_folder / "adapter_config.json", bad)
    torch.save({**tensors, "meta": Pickled()}, bad / "adapter_model.bin")
    with pytest.raises(GivenModelError, match=r"weights_only=True.*adapter_model.safetensors"):
        import_model(
            spec(base_dir),
            pre["ia3"],
            {"path": str(bad), "format": "peft"},
            "copy",
            tmp_path / "bad" / "model.safetensors",
        )


class Pickled:
    """An arbitrary object: torch.load(weights_only=True) refuses to unpickle it."""


# --- refusals of adapters ----------------------------------------------------------------------------
def test_adapter_refusals_name_both_values(base_dir, pre, ia3_folder, lora_folder, tmp_path):
    def refused(study, pre_path, folder, match):
        with pytest.raises(GivenModelError, match=match):
            import_model(
                spec(base_dir, **study),
                pre_path,
                {"path": str(folder), "format": "peft"},
                "d",
                tmp_path / "out" / "model.safetensors",
            )
        assert not (tmp_path / "out").exists()

    refused(LORA, pre["lora"], ia3_folder, r"peft_type is 'IA3' in the given adapter but 'LORA'")
    refused({}, pre["ia3"], lora_folder, r"peft_type is 'LORA' in the given adapter but 'IA3'")
    other = edited_copy(ia3_folder, tmp_path / "other_base", base_model_name_or_path="someone/other-llama")
    refused(
        {},
        pre["ia3"],
        other,
        r"base_model_name_or_path is 'someone/other-llama' but the study's base model is '"
        + str(base_dir)
        + r"'.*compared as given",
    )
    # other target modules (a real adapter on q_proj and down_proj)
    user_adapter(base_dir, tmp_path / "targets", target_modules=["q_proj", "down_proj"])
    refused(
        {},
        pre["ia3"],
        tmp_path / "targets",
        r"target_modules is \['down_proj', 'q_proj'\] in the given adapter but \['down_proj', 'k_proj', 'v_proj'\]",
    )
    ff = edited_copy(ia3_folder, tmp_path / "ff", feedforward_modules=[])
    refused({}, pre["ia3"], ff, r"feedforward_modules is \[\] in the given adapter but \['down_proj'\]")
    # another LoRA rank (a real rank-4 adapter)
    user_adapter(base_dir, tmp_path / "rank4", **{**LORA, "lora_r": 4})
    refused(LORA, pre["lora"], tmp_path / "rank4", r"r is 4 in the given adapter but 2 in the study's backend")
    alpha = edited_copy(lora_folder, tmp_path / "alpha", lora_alpha=16)
    refused(LORA, pre["lora"], alpha, r"lora_alpha is 16 in the given adapter but 3 .*scaling = lora_alpha / r")
    for field, value in (
        ("use_rslora", True),
        ("use_dora", True),
        ("fan_in_fan_out", True),
        ("bias", "all"),
        ("modules_to_save", ["lm_head"]),
    ):
        changed = edited_copy(lora_folder, tmp_path / field, **{field: value})
        refused(LORA, pre["lora"], changed, re.escape(f"{field} is {value!r} in the given adapter but"))
    # tensors the study's adapter lacks (a resized vocabulary saved with the adapter)
    from safetensors.torch import load_file, save_file

    extra = edited_copy(ia3_folder, tmp_path / "extra")
    tensors = load_file(str(extra / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(extra / "adapter_model.safetensors"))
    refused({}, pre["ia3"], extra, r"unexpected \['base_model.model.model.embed_tokens.weight'\]")
    refused(FULL, pre["full"], ia3_folder, r"peft_type is 'IA3' in the given adapter but 'adapter: none'")


def test_regex_target_modules_are_resolved_against_the_file(base_dir, pre, ia3_folder, tmp_path):
    folder = edited_copy(
        ia3_folder,
        tmp_path / "regex",
        target_modules=r".*\.(k_proj|v_proj|down_proj)",
        feedforward_modules=r".*\.down_proj",
    )
    out = tmp_path / "ft" / "model.safetensors"
    import_model(spec(base_dir), pre["ia3"], {"path": str(folder), "format": "peft"}, "copy", out)
    g = io.load_model(out)[1]["given"]
    assert g["target_modules"] == ["down_proj", "k_proj", "v_proj"] and g["feedforward_modules"] == ["down_proj"]


# --- full weights (adapter: none) ------------------------------------------------------------------
def test_adapter_none_backend(base_dir, pre, tmp_path):
    assert "adapter" in " ".join(CausalLMBackend.check_params({**CausalLMBackend.defaults, "adapter": "full"}))
    assert CausalLMBackend.check_params({**CausalLMBackend.defaults, "adapter": "none"}) == []
    be = backend(base_dir, **FULL)
    assert be.merges_per_forward == 1
    theta0, manifest = io.load_model(pre["full"])
    base = base_model(base_dir)
    named = dict(base.named_parameters())
    assert set(theta0) == set(named) and manifest["merge_parameters"] == sum(p.numel() for p in named.values())
    assert all(torch.equal(theta0[k], p.detach()) for k, p in named.items())
    model = be.load_pretrained(pre["full"])
    live = be.merge_params(model)
    assert set(live) == set(theta0) and all(p.requires_grad for p in live.values())
    # fine-tuning trains every weight with the shared loop
    path = lm_tiny.write_jsonl(tmp_path / "copy.jsonl", [lm_tiny.chat(q, a) for q, a in lm_tiny.copying(12)])
    from mergemix.data.prepared import load_prepared, prepare_dataset

    prepare_dataset("copy", {"source": "jsonl_chat", "path": str(path)}, SPLIT, tmp_path / "data")
    data = load_prepared(tmp_path / "data")
    before = be.mean_loss(model, be._encode(data, "val"))
    metrics = be.finetune(model, [data], {"epochs": 2, "lr": 0.003, "batch_size": 4, "optimizer": "adamw", "seed": 0})
    assert metrics["val_loss"] < before
    after = be.state_to_save(model)  # theta0 was read from the file, not shared with the live model
    assert all(not torch.equal(after[k], theta0[k]) for k in theta0)


@pytest.fixture(scope="module")
def full_folder(base_dir, tmp_path_factory):
    """A user's full fine-tune: the base model moved a little, saved by transformers in shards."""
    model = base_model(base_dir)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("user") / "full"
    model.save_pretrained(str(folder), max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, model


def test_full_weights_are_imported_with_their_values(base_dir, pre, full_folder, tmp_path):
    folder, user = full_folder
    out = tmp_path / "ft" / "model.safetensors"
    import_model(spec(base_dir, **FULL), pre["full"], {"path": str(folder)}, "copy", out)  # format: auto
    state, manifest = io.load_model(out)
    named = dict(user.named_parameters())
    assert set(state) == set(named) and all(torch.equal(state[k], p.detach()) for k, p in named.items())
    g = manifest["given"]
    assert g["format"] == "causal_lm_hf" and g["model_type"] == "llama" and g["architectures"] == ["LlamaForCausalLM"]
    assert "model.safetensors.index.json" in g["files"] and "config.json" in g["files"]
    assert 0.005 < g["relative_distance"] < 0.05
    # loaded into the backend's live model: the user's model's outputs; scored one state at a time
    be = backend(base_dir, **FULL)
    model = be.load_pretrained(pre["full"])
    theta0 = {k: v.clone() for k, v in be.state_to_save(model).items()}
    target = lm_tiny.adapter_target(be, model, tmp_path / "target", SPLIT)
    score0 = be.evaluate(model, target, "test")
    be.load_state(model, state)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, user(input_ids=IDS).logits, atol=1e-5)
    score = be.evaluate(user.eval(), target, "test")
    assert be.evaluate_many(model, target, "test", [state, theta0]) == [score, score0]


def test_full_weights_refusals(base_dir, pre, full_folder, tmp_path):
    folder, _ = full_folder

    def refused(study, pre_path, path, match):
        with pytest.raises(GivenModelError, match=match):
            import_model(
                spec(base_dir, **study),
                pre_path,
                {"path": str(path), "format": "causal_lm_hf"},
                "d",
                tmp_path / "out" / "model.safetensors",
            )

    wide = tmp_path / "wide"
    shutil.copytree(folder, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    refused(FULL, pre["full"], wide, r"hidden_size is 32 in the given model but 64 in the study's base model")
    refused({}, pre["ia3"], folder, r"set backend.params.adapter: none")
    # a model of the same architecture from another pre-training run: refused by the distance
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(base_model(base_dir).config)
    other.save_pretrained(str(tmp_path / "other"))
    refused(FULL, pre["full"], tmp_path / "other", r"away from the study's pre-trained model")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    refused(FULL, pre["full"], pickled, r"pickled weights are not read")


def test_tied_embeddings_are_merged_once(base_dir, tmp_path):
    """A base with tied input/output embeddings: the tied weight is one merge param (its first name);
    a file that also stores it under its second name gives it once, and must agree with itself."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    cfg = base_model(base_dir).config
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    tied = AutoModelForCausalLM.from_config(cfg)
    tied.generation_config.eos_token_id = cfg.eos_token_id
    tied.save_pretrained(str(tmp_path / "base"))
    lm_tiny.make_tokenizer().save_pretrained(str(tmp_path / "base"))
    pre = tmp_path / "pre" / "model.safetensors"
    backend(tmp_path / "base", **FULL).fetch_pretrained(pre)
    assert "lm_head.weight" not in io.load_model(pre)[0] and "model.embed_tokens.weight" in io.load_model(pre)[0]
    with torch.no_grad():
        for p in tied.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape))
    tied.save_pretrained(str(tmp_path / "user"))
    tensors = load_file(str(tmp_path / "user" / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # transformers stores a tied weight once
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # as older checkpoints do
    save_file(tensors, str(tmp_path / "user" / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ft" / "model.safetensors"
    import_model(spec(tmp_path / "base", **FULL), pre, {"path": str(tmp_path / "user")}, "copy", out)
    state = io.load_model(out)[0]
    assert set(state) == set(dict(tied.named_parameters()))
    assert torch.equal(state["model.embed_tokens.weight"], tied.model.embed_tokens.weight.detach())
    tensors["lm_head.weight"] += 1
    save_file(tensors, str(tmp_path / "user" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GivenModelError, match="'lm_head.weight' and 'model.embed_tokens.weight' are tied"):
        import_model(
            spec(tmp_path / "base", **FULL),
            pre,
            {"path": str(tmp_path / "user")},
            "copy",
            tmp_path / "ft2" / "model.safetensors",
        )
