"""Several merged adapters per forward pass (``evaluate_many``) score exactly what one at a time does."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import lm_tiny  # noqa: E402
from lm_tiny import base_dir, offline  # noqa: E402,F401 (shared fixtures)
from mergemix.backends import get_backend  # noqa: E402
from mergemix.backends.base import Backend  # noqa: E402
from mergemix.backends.causal_lm import StackedAdapters  # noqa: E402
from mergemix.data.prepared import load_prepared, prepare_dataset  # noqa: E402

SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
ADAPTERS = {
    "ia3": {},  # k_proj, v_proj (output scaling) and down_proj (feed-forward: input scaling)
    "lora": {"adapter": "lora", "lora_r": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}


@pytest.fixture(scope="module", autouse=True)
def _offline(offline):
    yield


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def setup(request, base_dir, tmp_path_factory):
    params = {"model": str(base_dir), "eval_batch_size": 4, **ADAPTERS[request.param]}
    be = get_backend({"name": "causal_lm", "params": params}, threads=1, device="cpu")
    pre = tmp_path_factory.mktemp("pre") / "model.safetensors"
    be.fetch_pretrained(pre)
    model = be.load_pretrained(pre)
    return request.param, be, model


@pytest.fixture(scope="module")
def target(setup, tmp_path_factory):
    """Two char-F1 benchmarks whose references are the completions of one random adapter (the
    first of ``random_states(..., seed=2)``), so that merged adapters score between 0 and 1."""
    name, be, model = setup
    tmp = tmp_path_factory.mktemp("target")
    be.load_state(model, random_states(be, model, 1, seed=2)[0])
    return lm_tiny.adapter_target(be, model, tmp, SPLIT)


def random_states(be, model, n, seed=0):
    """Adapters far from the initial one (LoRA's B starts at zero), so the merged models differ."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        st = {}
        for k, p in be.merge_params(model).items():
            noise = torch.randn(p.shape, generator=gen)
            st[k] = 1 + 0.7 * noise if "ia3_l" in k else 0.8 * noise
        out.append(st)
    return out


def test_stacked_forward_equals_each_adapter_loaded(setup):
    name, be, model = setup
    states = random_states(be, model, 3, seed=1)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45], [5, 6, 7, 8, 9, 10, 11]])
    expected = []
    with torch.no_grad():
        for st in states:
            be.load_state(model, st)
            expected.append(model(input_ids=ids).logits)
        live = {k: p.detach().clone() for k, p in be.merge_params(model).items()}
        with StackedAdapters(model, be.merge_params(model), states):
            got = model(input_ids=ids.repeat(3, 1)).logits
    for k in range(3):
        assert torch.allclose(got[2 * k : 2 * k + 2], expected[k], atol=1e-5, rtol=1e-5), (name, k)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)  # the adapters really differ
    # on exit: peft's own forward again, the live adapter untouched
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(torch.equal(p, live[k]) for k, p in be.merge_params(model).items())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected[-1], atol=1e-6)


def test_evaluate_many_equals_sequential_scores(setup, target):
    name, be, model = setup
    states = random_states(be, model, 8, seed=2)
    assert be.merges_per_forward == 8
    sequential = Backend.evaluate_many(be, model, target, "val", states)  # the generic one-at-a-time default
    for st, s in zip(states, sequential):
        be.load_state(model, st)
        assert be.evaluate(model, target, "val") == s
    batched = be.evaluate_many(model, target, "val", states)
    assert batched == pytest.approx(sequential, abs=1e-9), name
    assert sequential[0] > 0.9 and len(set(np.round(sequential, 6))) > 2  # the scores tell the merged models apart
    # the completions themselves, per merged adapter
    recs = target.split("val")[0]
    prompts = [be._chat_of(r)[:-1] for r in recs]
    with StackedAdapters(model, be.merge_params(model), states[:4]):
        copies = be._generate(model, prompts, 4, copies=4)
    for st, got in zip(states[:4], copies):
        be.load_state(model, st)
        assert got == be.generate(model, prompts, 4)
    assert len({tuple(c) for c in copies}) > 1


def test_evaluate_many_chunks_by_merges_per_forward(setup, target):
    name, be, model = setup
    states = random_states(be, model, 5, seed=3)
    sequential = Backend.evaluate_many(be, model, target, "test", states)
    be.merges_per_forward = 2  # chunks of 2, 2, 1
    try:
        assert be.evaluate_many(model, target, "test", states) == pytest.approx(sequential, abs=1e-9)
    finally:
        del be.merges_per_forward
    assert be.evaluate_many(model, target, "test", []) == []


def test_a_state_that_does_not_fit_is_refused(setup, target):
    name, be, model = setup
    good = random_states(be, model, 2)
    bad = dict(good[1])
    key = sorted(bad)[0]
    bad[key] = torch.ones(3)
    with pytest.raises(ValueError, match=f"state 1 does not fit.*{key}"):
        be.evaluate_many(model, target, "val", [good[0], bad])
    bad = dict(good[1])
    bad.pop(key)
    with pytest.raises(ValueError, match="missing"):
        be.evaluate_many(model, target, "val", [good[0], bad])
    assert not any("forward" in vars(m) for m in model.modules())


def test_generic_default_is_load_and_evaluate(tmp_path):
    prepare_dataset(
        "thin",
        {"source": "digits", "domain": "thin"},
        {"seed": 0, "val": 0.2, "test": 0.3, "max_train": 50},
        tmp_path / "thin",
    )
    data = load_prepared(tmp_path / "thin")
    be = get_backend({"name": "smallcnn", "params": {"channels": 2, "hidden": 8}}, device="cpu")
    assert be.merges_per_forward == 1
    model = be.create()
    gen = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(p.shape, generator=gen) for k, p in be.merge_params(model).items()} for _ in range(3)]
    got = be.evaluate_many(model, data, "val", states)
    assert len(got) == 3
    for st, s in zip(states, got):
        fresh = be.create()
        be.load_state(fresh, st)
        assert be.evaluate(fresh, data, "val") == s
