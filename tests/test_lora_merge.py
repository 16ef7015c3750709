"""What a merge means for adapters: LoRA is merged as its dense updates ``scaling * B @ A``
(``lora_merge: products``, the default), not as its factors; IA3 as its vectors."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import lm_tiny  # noqa: E402
from lm_tiny import base_dir, offline  # noqa: E402,F401 (shared fixtures)
from mergemix import io, merging  # noqa: E402
from mergemix.backends import get_backend  # noqa: E402
from mergemix.backends.base import Backend  # noqa: E402
from mergemix.backends.causal_lm import DELTA, StackedAdapters, _is_merge_forward  # noqa: E402

SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
# down_proj is 128 -> 64: the updates are not square
LORA = {"adapter": "lora", "lora_r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]}
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45], [5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module", autouse=True)
def _offline(offline):
    yield


def backend(base_dir, **params):
    return get_backend(
        {"name": "causal_lm", "params": {"model": str(base_dir), "eval_batch_size": 4, **params}},
        threads=1,
        device="cpu",
    )


@pytest.fixture(scope="module")
def lora(base_dir, tmp_path_factory):
    be = backend(base_dir, **LORA)
    pre = tmp_path_factory.mktemp("pre") / "model.safetensors"
    be.fetch_pretrained(pre)
    return be, pre


def random_states(be, model, n, seed=0):
    """Saved-space adapters far from the initial one (A and B random, as after fine-tuning)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            k: (1 + 0.7 * torch.randn(p.shape, generator=gen))
            if "ia3_l" in k
            else 0.8 * torch.randn(p.shape, generator=gen)
            for k, p in be.merge_params(model).items()
        }
        for _ in range(n)
    ]


def reference_logits(base_dir, states, scaling, ids=IDS):
    """A plain transformers model (no peft) whose adapted layers have ``W0 + mean_i(scaling B_i A_i)``."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    prefix, suffix = "base_model.model.", ".lora_A.default.weight"
    layers = [k[len(prefix) : -len(suffix)] for k in states[0] if k.endswith(suffix)]
    assert len(layers) == 2 * 3  # 2 transformer layers x 3 target modules
    with torch.no_grad():
        for name in layers:
            a = [st[f"{prefix}{name}.lora_A.default.weight"] for st in states]
            b = [st[f"{prefix}{name}.lora_B.default.weight"] for st in states]
            update = torch.stack([scaling * bi @ ai for ai, bi in zip(a, b)]).mean(0)
            ref.get_submodule(name).weight += update
        return ref(input_ids=ids).logits


def test_uniform_merge_of_lora_is_the_mean_of_the_updates_not_of_the_factors(base_dir, lora):
    be, pre = lora
    assert be.params["lora_merge"] == "products"
    model = be.load_pretrained(pre)
    states = random_states(be, model, 3, seed=1)
    # as the merge engine does: theta0 and the rows in merge space, the merged vector written in place
    live = be.merge_space_params(model)
    keys = list(live)
    theta0 = merging.flatten_state(live, keys)
    rows = torch.stack([merging.flatten_state(be.to_merge_space(st), keys) for st in states])
    merging.LiveParams([live[k] for k in keys]).write(merging.merge("uniform", rows, theta0))
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    want = reference_logits(base_dir, states, scaling=3 / 2)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)  # float rounding: W0 x + dW x vs (W0 + dW) x
    # task arithmetic with scale 1/k from theta0 (zero updates) is the same merge
    merging.LiveParams([live[k] for k in keys]).write(merging.merge("task_arithmetic", rows, theta0, scale=1 / 3))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, want, atol=1e-4, rtol=1e-5)
    # the factors' average (lora_merge: factors) is another model
    fac = backend(base_dir, **LORA, lora_merge="factors")
    fmodel = fac.load_pretrained(pre)
    assert fac.merge_space_params(fmodel).keys() == fac.merge_params(fmodel).keys()
    fkeys = list(fac.merge_space_params(fmodel))
    frows = torch.stack([merging.flatten_state(fac.to_merge_space(st), fkeys) for st in states])
    merging.unflatten_into(frows.mean(0), [fac.merge_space_params(fmodel)[k] for k in fkeys])
    with torch.no_grad():
        factors = fmodel(input_ids=IDS).logits
    assert (factors - want).abs().max() > 0.1
    assert not any(DELTA in m._buffers for m in fmodel.modules())


def test_pretrained_lora_is_zero_in_merge_space(lora):
    be, pre = lora
    state, _ = io.load_model(pre)
    dense = be.to_merge_space(state)
    model = be.load_pretrained(pre)
    assert not be.in_merge_space(model)
    live = be.merge_space_params(model)
    assert be.in_merge_space(model) and be.merge_space_params(model)[next(iter(live))] is live[next(iter(live))]
    assert set(dense) == set(live) and all(k.endswith("." + DELTA) for k in live) and len(live) == 6
    for k, t in live.items():
        layer = model.get_submodule(k[: -len(DELTA) - 1])
        assert t.dtype == torch.float32 and tuple(t.shape) == (layer.out_features, layer.in_features)
        assert tuple(dense[k].shape) == tuple(t.shape) and dense[k].dtype == torch.float32
        assert not t.any() and not dense[k].any()
    # saved files and fine-tuning keep the factors
    assert set(be.state_to_save(model)) == set(state)
    with pytest.raises(RuntimeError, match="leave_merge_space"):
        be.finetune(model, [], {})


def test_ia3_and_factors_merge_space_is_the_saved_state(base_dir, lora, tmp_path):
    be = backend(base_dir)  # ia3
    be.fetch_pretrained(tmp_path / "model.safetensors")
    state, _ = io.load_model(tmp_path / "model.safetensors")
    model = be.load_pretrained(tmp_path / "model.safetensors")
    assert be.to_merge_space(state) is state
    live, params = be.merge_space_params(model), be.merge_params(model)
    assert list(live) == list(params) and all(live[k] is params[k] for k in live)
    assert all(torch.equal(v, torch.ones_like(v)) for v in state.values())  # IA3 starts at ones: task vectors l_i - 1
    fac = backend(base_dir, **LORA, lora_merge="factors")
    fstate, _ = io.load_model(lora[1])
    assert fac.to_merge_space(fstate) is fstate


def test_merge_space_forward_equals_the_factors_and_saved_states_still_load(lora):
    be, pre = lora
    model = be.load_pretrained(pre)
    st = random_states(be, model, 1, seed=5)[0]
    be.load_state(model, st)
    with torch.no_grad():
        peft_logits = model(input_ids=IDS).logits
        be.merge_space_params(model)  # enters merge space with the dense updates of the loaded factors
        assert torch.allclose(model(input_ids=IDS).logits, peft_logits, atol=1e-5)
        be.load_state(model, random_states(be, model, 1, seed=6)[0])
        be.load_state(model, st)  # a saved state loaded in merge space sets the updates too
        assert torch.allclose(model(input_ids=IDS).logits, peft_logits, atol=1e-5)
        be.load_merge_state(model, be.to_merge_space(st))
        assert torch.allclose(model(input_ids=IDS).logits, peft_logits, atol=1e-5)
        be.leave_merge_space(model)
        assert not be.in_merge_space(model) and not any("forward" in vars(m) for m in model.modules())
        assert torch.equal(model(input_ids=IDS).logits, peft_logits)


def test_stacked_dense_updates_equal_each_loaded(lora):
    be, pre = lora
    model = be.load_pretrained(pre)
    live = be.merge_space_params(model)
    states = [be.to_merge_space(st) for st in random_states(be, model, 3, seed=7)]
    expected = []
    with torch.no_grad():
        for st in states:
            be.load_merge_state(model, st)
            expected.append(model(input_ids=IDS).logits)
        with StackedAdapters(model, live, states):
            got = model(input_ids=IDS.repeat(3, 1)).logits
        # on exit the merge-space forward is back, with the last state
        assert all(_is_merge_forward(vars(model.get_submodule(k[: -len(DELTA) - 1]))["forward"]) for k in live)
        assert torch.allclose(model(input_ids=IDS).logits, expected[-1], atol=1e-6)
    for k in range(3):
        assert torch.allclose(got[2 * k : 2 * k + 2], expected[k], atol=1e-5, rtol=1e-5), k
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)


@pytest.fixture(scope="module")
def target(lora, tmp_path_factory):
    """Two char-F1 benchmarks whose references are the completions of one random adapter."""
    be, pre = lora
    model = be.load_pretrained(pre)
    tmp = tmp_path_factory.mktemp("target")
    be.load_state(model, random_states(be, model, 1, seed=2)[0])
    return lm_tiny.adapter_target(be, model, tmp, SPLIT)


def test_evaluate_many_of_merged_dense_states_equals_sequential(lora, target):
    be, pre = lora
    model = be.load_pretrained(pre)
    saved = random_states(be, model, 6, seed=2)
    keys = list(be.merge_space_params(model))
    rows = torch.stack([merging.flatten_state(be.to_merge_space(st), keys) for st in saved])
    # merged states in merge space: single models and averages of pairs and triples
    states = []
    for idx in ([0], [1], [0, 1], [2, 3, 4], [1, 5], [0, 2, 4, 5]):
        vec = merging.merge("uniform", rows[idx])
        sizes = [t.numel() for t in be.merge_space_params(model).values()]
        parts = torch.split(vec, sizes)
        states.append({k: p.view_as(be.merge_space_params(model)[k]).clone() for k, p in zip(keys, parts)})
    sequential = []
    for st in states:
        be.load_merge_state(model, st)
        sequential.append(be.evaluate(model, target, "val"))
    assert Backend.evaluate_many(be, model, target, "val", states) == sequential  # the generic default
    assert (
        StackedAdapters.unsupported(model, be.merge_space_params(model)) is None
    )  # the batched path, not the fallback
    batched = be.evaluate_many(model, target, "val", states)
    assert batched == pytest.approx(sequential, abs=1e-9)
    assert sequential[0] > 0.9 and len(set(round(s, 6) for s in sequential)) > 2
    # saved states on a model in merge space: what each scores loaded (the updates follow the factors)
    direct = []
    for st in saved[:3]:
        be.load_state(model, st)
        direct.append(be.evaluate(model, target, "val"))
    assert be.evaluate_many(model, target, "val", saved[:3]) == pytest.approx(direct, abs=1e-9)
    assert direct[0] == pytest.approx(sequential[0], abs=1e-9)
    assert all(_is_merge_forward(vars(m)["forward"]) for m in model.modules() if DELTA in m._buffers)


def test_lora_merge_is_validated(base_dir):
    with pytest.raises(ValueError, match="lora_merge: 'sum' is not allowed.*products, factors"):
        backend(base_dir, **LORA, lora_merge="sum")
    from mergemix.backends.causal_lm import CausalLMBackend

    assert CausalLMBackend.check_params({**CausalLMBackend.defaults, "lora_merge": "factors"}) == []


def test_merge_only_params_do_not_make_a_model_foreign():
    """A model fine-tuned before lora_merge existed (or with another eval_batch_size) is the same
    backend's; a training param still is not."""
    from mergemix import provenance
    from mergemix.backends.causal_lm import CausalLMBackend

    ignore = CausalLMBackend.merge_only_params
    now = {
        "name": "causal_lm",
        "params": {"adapter": "lora", "lora_r": 8, "lora_merge": "products", "eval_batch_size": 8},
    }
    old = {"name": "causal_lm", "params": {"adapter": "lora", "lora_r": 8, "eval_batch_size": 32}}
    assert provenance._backend_diff(old, now, ignore) is None
    assert provenance._backend_diff(old, now) == ("backend.params.eval_batch_size", 32, 8)
    assert provenance._backend_diff({**old, "params": {**old["params"], "lora_r": 4}}, now, ignore) == (
        "backend.params.lora_r",
        4,
        8,
    )
