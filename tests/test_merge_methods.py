"""The merge methods of mergemix.merge_methods against their references.

Two kinds of reference: the papers' formulas written out here in numpy (always run), and
mergekit's own functions (``GeneralizedTaskArithmeticMerge.merge_group``, ``sparsify``,
``get_mask``; skipped without mergekit, a test extra).
"""

import numpy as np
import pytest
import torch

from mergemix import merge_methods as mm
from mergemix import merging
from mergemix.merge_methods import _ops


def rand(k=4, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n, generator=g)
    return theta0 + torch.randn(k, n, generator=g), theta0


def ties_reference(thetas, theta0, density, lam=1.0, weights=None, segments=None):
    """TIES written out (numpy): trim per row and scope to the int(density*n) largest |delta|,
    weight, elect the sign of the summed deltas (+ on a tie), disjoint weighted mean, scale."""
    d = (thetas - theta0).double().numpy()
    k, n = d.shape
    w = np.ones(k) if weights is None else np.asarray(weights, float)
    bounds = np.cumsum([0] + list(segments or [n]))
    trimmed = np.zeros_like(d)
    for a, b in zip(bounds[:-1], bounds[1:]):
        keep = max(1, int(density * (b - a))) if density < 1 else b - a
        for i in range(k):
            order = np.argsort(-np.abs(d[i, a:b]), kind="stable")[:keep]
            trimmed[i, a + order] = d[i, a + order]
    wd = trimmed * w[:, None]
    elected = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(wd) == elected) & (wd != 0)
    total = (w[:, None] * agree).sum(0)
    merged = (wd * agree).sum(0) / np.where(total == 0, 1, total)
    return torch.from_numpy(theta0.double().numpy() + lam * merged).float()


# --- weighted, uniform, task arithmetic ------------------------------------------------------------
def test_one_hot_weights_reproduce_the_single_model_exactly():
    thetas, theta0 = rand()
    for i in range(4):
        w = [0.0] * 4
        w[i] = 3.0
        assert torch.equal(mm.apply("weighted", thetas, theta0, weights=w), thetas[i])


def test_weighted_average_is_the_normalised_weighted_sum():
    thetas, _ = rand()
    assert torch.allclose(mm.apply("weighted", thetas, weights=[1, 1, 1, 1]), thetas.mean(0), atol=1e-6)
    assert torch.allclose(mm.apply("weighted", thetas), thetas.mean(0))
    assert torch.allclose(mm.apply("weighted", thetas, weights=[2, 0, 1, 0]), thetas[[0, 0, 2]].mean(0), atol=1e-6)
    w = torch.tensor([0.1, 0.5, 0.3, 0.1])
    ref = (thetas.double() * (w.double() / w.sum())[:, None]).sum(0).float()
    assert torch.allclose(mm.apply("weighted", thetas, weights=w.tolist()), ref, atol=1e-6)


def test_uniform_weights_reproduce_the_subset_average():
    thetas, theta0 = rand(k=5)
    subset = [0, 2, 3]
    sub = mm.apply("weighted", thetas, weights=[1 if i in subset else 0 for i in range(5)])
    assert torch.allclose(sub, mm.apply("uniform", thetas[subset]), atol=1e-6)
    assert torch.allclose(mm.apply("uniform", thetas[subset]), thetas[subset].mean(0))


def test_task_arithmetic_with_lambda_one_over_k_is_the_uniform_average():
    thetas, theta0 = rand()
    ta = mm.apply("task_arithmetic", thetas, theta0, **{"lambda": 0.25})
    assert torch.allclose(ta, thetas.mean(0), atol=1e-5)
    assert torch.equal(mm.apply("task_arithmetic", thetas, theta0, scale=0.25), ta)  # scale is lambda's alias
    assert torch.allclose(mm.apply("task_arithmetic", thetas, theta0, normalize=True), thetas.mean(0), atol=1e-5)
    w = [0.5, 2.0, 0.0, 1.0]
    ref = theta0 + 0.3 * sum(wi * (t - theta0) for wi, t in zip(w, thetas))
    assert torch.allclose(mm.apply("task_arithmetic", thetas, theta0, weights=w, **{"lambda": 0.3}), ref, atol=1e-5)
    with pytest.raises(ValueError, match="theta0"):
        mm.apply("task_arithmetic", thetas)


# --- TIES --------------------------------------------------------------------------------------------
def test_ties_on_a_hand_computed_example():
    theta0 = torch.zeros(4)
    thetas = torch.tensor([[1.0, -2.0, 3.0, 0.0], [2.0, 1.5, -1.0, 0.0], [-4.0, 1.0, -1.0, 5.0]])
    # density 1: signs of the sums (-1, 0.5, 1, 5) are (-, +, +, +); disjoint means over agreeing nonzeros
    assert torch.equal(mm.apply("ties", thetas, theta0, density=1), torch.tensor([-4.0, 1.25, 3.0, 5.0]))
    # density 0.5 keeps 2 of 4 per row: [0,-2,3,0], [2,1.5,0,0], [-4,0,0,5]; sums (-2,-0.5,3,5)
    out = mm.apply("ties", thetas, theta0, density=0.5, **{"lambda": 0.5})
    assert torch.equal(out, 0.5 * torch.tensor([-4.0, -2.0, 3.0, 5.0]))


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_ties_equals_the_paper_formula(density):
    thetas, theta0 = rand(k=5, n=400, seed=1)
    out = mm.apply("ties", thetas, theta0, density=density, **{"lambda": 1.3})
    assert torch.allclose(out, ties_reference(thetas, theta0, density, 1.3), atol=1e-5)
    w = [0.2, 1.0, 0.0, 3.0, 0.5]
    out = mm.apply("ties", thetas, theta0, density=density, weights=w)
    assert torch.allclose(out, ties_reference(thetas, theta0, density, weights=w), atol=1e-5)


def test_ties_trims_per_tensor_with_scope_tensor():
    thetas, theta0 = rand(k=3, n=100, seed=2)
    segments = [10, 60, 30]
    out = mm.apply("ties", thetas, theta0, density=0.3, scope="tensor", segments=segments)
    assert torch.allclose(out, ties_reference(thetas, theta0, 0.3, segments=segments), atol=1e-5)
    assert not torch.allclose(out, mm.apply("ties", thetas, theta0, density=0.3, segments=segments))
    with pytest.raises(ValueError, match="segments"):
        mm.apply("ties", thetas, theta0, density=0.3, scope="tensor")
    with pytest.raises(ValueError, match="adding up to 100"):
        mm.apply("ties", thetas, theta0, density=0.3, scope="tensor", segments=[10, 60])


def test_ties_with_density_one_and_agreeing_signs_is_the_average_of_deltas():
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(200, generator=g)
    signs = torch.randn(200, generator=g).sign()
    deltas = torch.rand(4, 200, generator=g).add(0.01) * signs
    thetas = theta0 + deltas
    out = mm.apply("ties", thetas, theta0, density=1.0)
    assert torch.allclose(out, theta0 + deltas.mean(0), atol=1e-6)
    assert torch.allclose(out, mm.apply("uniform", thetas), atol=1e-5)


# --- DARE ---------------------------------------------------------------------------------------------
def test_dare_mask_is_bernoulli_and_kept_entries_are_rescaled_by_one_over_one_minus_p():
    thetas, theta0 = rand(k=3, n=50_000, seed=4)
    deltas = thetas - theta0
    p = 0.7
    out = _ops.drop_random(deltas, 1 - p, seed=5)
    kept = out != 0
    assert torch.equal(out[kept], deltas[kept] / (1 - p))  # exactly 1/(1-p)
    frac = kept.float().mean(1)
    sd = (p * (1 - p) / deltas.shape[1]) ** 0.5
    assert torch.all((frac - (1 - p)).abs() < 5 * sd), frac
    assert not torch.equal(kept[0], kept[1])  # each model draws its own mask


def test_dare_preserves_the_expected_task_vector():
    g = torch.Generator().manual_seed(6)
    deltas = torch.randn(1, 100, generator=g)
    density, draws = 0.4, 2000
    mean = torch.stack([_ops.drop_random(deltas, density, seed=s)[0] for s in range(draws)]).double().mean(0)
    sd = deltas[0].double().abs() * ((1 - density) / (density * draws)) ** 0.5
    assert torch.all((mean - deltas[0].double()).abs() < 5 * sd + 1e-12)


def test_dare_is_reproducible_for_its_seed_and_a_model_keeps_its_mask_across_subsets():
    thetas, theta0 = rand(k=4, n=500, seed=7)
    a = mm.apply("dare", thetas, theta0, density=0.3, seed=11)
    assert torch.equal(a, mm.apply("dare", thetas, theta0, density=0.3, seed=11))
    assert not torch.equal(a, mm.apply("dare", thetas, theta0, density=0.3, seed=12))
    assert torch.equal(a, mm.apply("dare", thetas, theta0, p=0.7, seed=11))  # p = 1 - density
    deltas = thetas - theta0
    in_two = _ops.drop_random(deltas[[0, 2]], 0.3, 11, rows=[0, 2])
    in_three = _ops.drop_random(deltas[[1, 2, 3]], 0.3, 11, rows=[1, 2, 3])
    assert torch.equal(in_two[1], in_three[1])  # model 2: the same mask in both subsets
    out = mm.apply("dare", thetas[[0, 2]], theta0, density=0.3, seed=11, rows=[0, 2])
    assert torch.allclose(out, theta0 + in_two.mean(0), atol=1e-6)


def test_dare_combines_the_dropped_task_vectors_linearly():
    thetas, theta0 = rand(k=3, n=400, seed=8)
    assert torch.allclose(mm.apply("dare", thetas, theta0, density=1), thetas.mean(0), atol=1e-5)
    dropped = _ops.drop_random(thetas - theta0, 0.6, 3)
    w = [1.0, 0.5, 2.0]
    ref = theta0 + 0.8 * sum(wi * d for wi, d in zip(w, dropped)) / sum(w)
    out = mm.apply("dare", thetas, theta0, density=0.6, seed=3, weights=w, **{"lambda": 0.8})
    assert torch.allclose(out, ref, atol=1e-5)
    ref = theta0 + sum(wi * d for wi, d in zip(w, dropped))  # normalize: false (mergekit's dare_linear)
    out = mm.apply("dare", thetas, theta0, density=0.6, seed=3, weights=w, normalize=False)
    assert torch.allclose(out, ref, atol=1e-5)


def test_dare_rescale_l1_restores_each_scope_norm_and_none_keeps_entries():
    thetas, theta0 = rand(k=2, n=90, seed=9)
    deltas = thetas - theta0
    segments = [30, 50, 10]
    l1 = _ops.drop_random(deltas, 0.5, 1, rescale="l1", segments=segments)
    none = _ops.drop_random(deltas, 0.5, 1, rescale="none")
    kept = none != 0
    assert torch.equal(none[kept], deltas[kept]) and torch.equal(kept, l1 != 0)
    for a, b in _ops.spans(90, segments):
        assert torch.allclose(l1[:, a:b].abs().sum(1), deltas[:, a:b].abs().sum(1), rtol=1e-5)


def test_dare_ties_is_the_ties_election_of_the_dropped_deltas():
    thetas, theta0 = rand(k=4, n=300, seed=10)
    dropped = _ops.drop_random(thetas - theta0, 0.5, 2)
    out = mm.apply("dare_ties", thetas, theta0, density=0.5, seed=2, **{"lambda": 1.5})
    assert torch.allclose(out, ties_reference(theta0 + dropped, theta0, 1.0, 1.5), atol=1e-5)
    assert torch.allclose(
        mm.apply("dare_ties", thetas, theta0, density=1), mm.apply("ties", thetas, theta0, density=1), atol=1e-6
    )


# --- adapters: what the methods mean for IA3 vectors and LoRA factors ------------------------------
def test_ia3_vectors_merge_as_scalings_around_the_identity():
    """IA3's theta0 is all ones: trimmed or dropped entries go back to exactly 1 (no scaling)."""
    g = torch.Generator().manual_seed(18)
    theta0 = torch.ones(400)
    thetas = 1 + 0.1 * torch.randn(3, 400, generator=g)
    for method, options in [("ties", {"density": 0.2}), ("dare", {"density": 0.3}), ("dare_ties", {"density": 0.3})]:
        single = mm.apply(method, thetas[:1], theta0, **options)
        untouched = single == 1.0
        frac = untouched.float().mean().item()
        assert abs(frac - (1 - options["density"])) < 0.1, (method, frac)
    mm.apply("dare", thetas, theta0, scope="tensor")  # no segments needed: only rescale: l1 has a scope
    w = [0.2, 0.3, 0.5]  # weights summing to 1: peft's IA3 add_weighted_adapter, sum_i w_i l_i
    assert torch.allclose(mm.apply("weighted", thetas, weights=w), sum(wi * t for wi, t in zip(w, thetas)), atol=1e-6)


def test_lora_factor_merging_is_not_product_merging():
    """Averaging A and B separately (a flat vector of factors) is not averaging the updates B @ A;
    concatenating the factors (rank k*r) is exact for the linear methods."""
    g = torch.Generator().manual_seed(19)
    k, r, n_in, n_out = 3, 2, 6, 5
    a0 = torch.randn(r, n_in, generator=g)  # peft's seeded init, shared; B starts at 0
    As = a0 + 0.3 * torch.randn(k, r, n_in, generator=g)
    Bs = torch.randn(k, n_out, r, generator=g)
    flat = torch.cat([As.reshape(k, -1), Bs.reshape(k, -1)], dim=1)
    merged = mm.apply("uniform", flat)
    a_m, b_m = merged[: r * n_in].view(r, n_in), merged[r * n_in :].view(n_out, r)
    exact = (Bs @ As).mean(0)
    assert not torch.allclose(b_m @ a_m, exact, atol=1e-3)
    w = torch.full((k,), 1 / k)
    b_cat = torch.cat([wi * b for wi, b in zip(w, Bs)], dim=1)  # [n_out, k*r]
    a_cat = torch.cat(list(As), dim=0)  # [k*r, n_in]
    assert torch.allclose(b_cat @ a_cat, exact, atol=1e-6)


# --- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,key,value,allowed",
    [
        ("ties", "density", 0, "(0, 1]"),
        ("ties", "density", 1.5, "(0, 1]"),
        ("ties", "density", "0.2", "(0, 1]"),
        ("ties", "lambda", -1, "> 0"),
        ("ties", "lambda", True, "> 0"),
        ("ties", "scope", "layer", "global or tensor"),
        ("ties", "normalize", "yes", "true or false"),
        ("dare", "p", 1.0, "[0, 1)"),
        ("dare", "p", -0.1, "[0, 1)"),
        ("dare", "seed", -1, "an integer"),
        ("dare", "seed", 1.5, "an integer"),
        ("dare", "seed", 2**32, "an integer"),
        ("dare", "rescale", "l2", "inverse, l1, none"),
        ("dare_ties", "density", float("nan"), "(0, 1]"),
        ("weighted", "weights", [1, -1], "numbers >= 0"),
        ("weighted", "weights", [0, 0], "not all 0"),
        ("weighted", "weights", "1,2", "a list"),
        ("task_arithmetic", "scale", 0, "> 0"),
    ],
)
def test_bad_option_values_are_refused_naming_the_key_the_value_and_the_range(method, key, value, allowed):
    problems = mm.check_options(method, {key: value})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"merge_eval.options.{key}: {value!r} ")
    assert allowed in problems[0] and "leave it out for the default" in problems[0]
    thetas, theta0 = rand(k=2, n=10)
    with pytest.raises(ValueError, match=f"options.{key}"):
        mm.apply(method, thetas, theta0, **{key: value})


def test_unknown_keys_list_the_allowed_ones_and_good_options_pass():
    (problem,) = mm.check_options("ties", {"k": 20})
    assert problem.startswith("merge_eval.options.k: unknown option")
    assert problem.endswith("allowed: density, lambda, weights, normalize, scope")
    (problem,) = mm.check_options("uniform", {"lambda": 1})
    assert "takes no options" in problem
    assert mm.check_options("nope", {})[0].startswith("merge_eval.options: unknown merge method 'nope'")
    assert "not a mapping" in mm.check_options("ties", [0.2])[0]
    good = {
        "uniform": {},
        "weighted": {"weights": (1, 0, 2.5)},
        "task_arithmetic": {"lambda": 2, "normalize": True},
        "ties": {"density": 1, "lambda": 0.7, "scope": "tensor", "weights": [1, 1, 1]},
        "dare": {"p": 0, "seed": 3, "rescale": "l1"},
        "dare_ties": {"density": 0.1, "normalize": False},
    }
    assert sorted(good) == mm.method_names()
    for method, options in good.items():
        assert mm.check_options(method, options, n_models=3) == [], method
    (problem,) = mm.check_options("weighted", {"weights": [1, 2]}, n_models=3)
    assert problem.startswith("merge_eval.options.weights: 2 weights for 3 merged models")
    (problem,) = mm.check_options("dare", {"p": 0.1, "density": 0.9}, prefix="x")
    assert problem.startswith("x.p: p and density are two spellings") and "keep one" in problem
    (problem,) = mm.check_options("task_arithmetic", {"scale": 1, "lambda": 2})
    assert "scale and lambda" in problem


def test_options_resolve_to_the_functions_keywords_with_defaults():
    assert mm.resolve_options("ties", {}) == {
        "density": 0.2,
        "lambda_": 1.0,
        "weights": None,
        "normalize": True,
        "scope": "global",
    }
    assert mm.resolve_options("dare", {"p": 0.9})["density"] == 0.1
    assert mm.resolve_options("task_arithmetic", {"scale": 0.5})["lambda_"] == 0.5
    assert mm.resolve_options("weighted", {"weights": torch.tensor([1.0, 2.0])}) == {"weights": [1.0, 2.0]}


def test_linear_coefficients_reproduce_the_linear_methods():
    thetas, theta0 = rand(k=3, n=100, seed=17)
    cases = [
        ("uniform", {}),
        ("weighted", {}),
        ("task_arithmetic", {}),
        ("task_arithmetic", {"scale": 0.3}),
        ("task_arithmetic", {"lambda": 0.5, "normalize": True}),
    ]
    for method, options in cases:
        a, b = mm.linear_coefficients(method, 3, **options)
        assert torch.allclose(a * thetas.sum(0) + b * theta0, mm.apply(method, thetas, theta0, **options), atol=1e-5)
    for method, options in [
        ("weighted", {"weights": [1, 2, 3]}),
        ("task_arithmetic", {"weights": [1, 1, 1]}),
        ("ties", {}),
        ("dare", {"density": 1}),
        ("dare_ties", {}),
    ]:
        assert mm.linear_coefficients(method, 3, **options) is None, method
    with pytest.raises(ValueError, match="options.lambda"):
        mm.linear_coefficients("task_arithmetic", 3, **{"lambda": -1})


@pytest.fixture
def registry():
    tables = [t for t in (merging.MERGE_METHODS, getattr(merging, "LINEAR", None)) if t is not None]
    saved = [dict(t) for t in tables]
    yield merging.MERGE_METHODS
    for t, old in zip(tables, saved):
        t.clear()
        t.update(old)


def test_register_all_adds_the_methods_to_the_registry_once(registry):
    taken = {n for n in mm.METHODS if n in registry}
    added = mm.register_all()
    assert set(added) == set(mm.METHODS) - taken and mm.register_all() == []
    thetas, theta0 = rand(k=3, n=50)
    out = merging.merge("ties", thetas, theta0, density=0.5, segments=[20, 30], scope="tensor")
    assert torch.equal(out, mm.apply("ties", thetas, theta0, density=0.5, segments=[20, 30], scope="tensor"))
    assert merging.get_merge_method("dare").options is mm.METHODS["dare"].options
    with pytest.raises(ValueError, match="options.density: 2"):
        merging.merge("ties", thetas, theta0, density=2)
    if hasattr(merging, "linear_coefficients"):  # the engine's incremental path for linear methods
        assert merging.linear_coefficients("weighted", 4) == (0.25, 0.0)
        assert merging.linear_coefficients("weighted", 4, weights=[1, 2, 3, 4]) is None
        assert merging.linear_coefficients("ties", 4) is None


# --- against mergekit -----------------------------------------------------------------------------------
def mergekit_merge(name, thetas, theta0, *, density=1.0, weights=None, normalize, lam=1.0, rescale=False):
    """mergekit's own merge of one tensor group (its GeneralizedTaskArithmeticMerge.merge_group)."""
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([theta0, *thetas], base_index=0)
    ids = [e.id for e in group.non_base]
    w = [1.0] * len(ids) if weights is None else list(weights)
    return mk_registry.get(name).merge_group(
        group,
        density={i: density for i in ids},
        weight=dict(zip(ids, w)),
        normalize=normalize,
        rescale=rescale,
        int8_mask=False,
        **{"lambda": lam},
    )


@pytest.fixture
def mergekit():
    return pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")


@pytest.mark.parametrize("density", [0.01, 0.1, 0.35, 0.9, 1.0])
def test_trim_equals_mergekit_magnitude_sparsify(mergekit, density):
    from mergekit.sparsify import SparsificationMethod, sparsify

    thetas, theta0 = rand(k=3, n=257, seed=12)
    deltas = thetas - theta0
    ours = _ops.trim_magnitude(deltas, density)
    for i in range(3):
        assert torch.equal(ours[i], sparsify(deltas[i], density, method=SparsificationMethod.magnitude))


def test_sign_election_equals_mergekit_get_mask(mergekit):
    thetas, theta0 = rand(k=5, n=300, seed=13)
    deltas = _ops.trim_magnitude(thetas - theta0, 0.3)  # many zeros
    deltas[:, :3] = torch.tensor([[1.0], [-1.0], [0.0], [2.0], [-2.0]])  # exact ties elect +
    ours = deltas.sign() == _ops.elect_sign(deltas)
    assert torch.equal(ours, mergekit.get_mask(deltas, method="sum", mask_dtype=torch.float32))


@pytest.mark.parametrize(
    "normalize,lam,weights", [(True, 1.0, None), (False, 0.6, [0.3, 1.0, 2.0, 0.0]), (True, 1.7, [1, 2, 3, 4])]
)
def test_ties_and_task_arithmetic_equal_mergekit(mergekit, normalize, lam, weights):
    thetas, theta0 = rand(k=4, n=500, seed=14)
    opts = {"lambda": lam, "normalize": normalize, "weights": weights}
    for density in (0.2, 0.7, 1.0):
        ref = mergekit_merge("ties", thetas, theta0, density=density, weights=weights, normalize=normalize, lam=lam)
        assert torch.allclose(mm.apply("ties", thetas, theta0, density=density, **opts), ref, atol=1e-5)
    ref = mergekit_merge("task_arithmetic", thetas, theta0, weights=weights, normalize=normalize, lam=lam)
    assert torch.allclose(mm.apply("task_arithmetic", thetas, theta0, **opts), ref, atol=1e-5)


def test_ties_scope_tensor_equals_mergekit_tensor_by_tensor(mergekit):
    thetas, theta0 = rand(k=3, n=4 * 6 + 6 + 50, seed=15)
    segments = [24, 6, 50]
    bounds = _ops.spans(thetas.shape[1], segments)
    ref = torch.cat(
        [mergekit_merge("ties", thetas[:, a:b], theta0[a:b], density=0.25, normalize=True) for a, b in bounds]
    )
    out = mm.apply("ties", thetas, theta0, density=0.25, scope="tensor", segments=segments)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("name,ours", [("dare_linear", "dare"), ("dare_ties", "dare_ties")])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_equals_mergekit_with_matched_seeds(mergekit, monkeypatch, name, ours, rescale):
    """mergekit draws each model's mask with torch.bernoulli on the global generator; seeding that
    generator as ours is seeded per model (row_seed) makes the draws the same."""
    thetas, theta0 = rand(k=4, n=600, seed=16)
    seed, density, weights = 21, 0.4, [1.0, 0.5, 2.0, 0.25]
    real, calls = mergekit.sparsify, iter(range(4))

    def seeded(tensor, **kw):
        torch.manual_seed(_ops.row_seed(seed, next(calls)))
        return real(tensor, **kw)

    monkeypatch.setattr(mergekit, "sparsify", seeded)
    with torch.random.fork_rng(devices=[]):
        ref = mergekit_merge(
            name, thetas, theta0, density=density, weights=weights, normalize=False, lam=0.9, rescale=rescale
        )
    out = mm.apply(
        ours,
        thetas,
        theta0,
        density=density,
        seed=seed,
        weights=weights,
        normalize=False,
        rescale="l1" if rescale else "none",
        **{"lambda": 0.9},
    )
    assert torch.allclose(out, ref, atol=1e-5)
