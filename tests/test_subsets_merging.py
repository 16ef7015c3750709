import itertools

import pytest
import torch

from mergemix import merging, subsets


def test_uniform_average_equals_hand_computation():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([3.0, 6.0, -1.0])
    c = torch.tensor([5.0, 1.0, 4.0])
    out = merging.merge("uniform", torch.stack([a, b, c]))
    assert torch.allclose(out, torch.tensor([9 / 3, 9 / 3, 6 / 3]))


def test_task_arithmetic_with_scale_one_over_k_is_the_average():
    theta0 = torch.randn(50)
    thetas = torch.randn(4, 50)
    ta = merging.merge("task_arithmetic", thetas, theta0, scale=0.25)
    assert torch.allclose(ta, merging.merge("uniform", thetas, theta0), atol=1e-6)


def test_unknown_merge_method_names_the_registered_ones():
    with pytest.raises(KeyError, match="uniform.*weighted") as e:
        merging.get_merge_method("slerp")
    for name in ("dare", "dare_ties", "task_arithmetic", "ties"):
        assert name in str(e.value)
    assert set(merging.method_names()) >= {"uniform", "weighted", "task_arithmetic", "ties", "dare", "dare_ties"}


def test_flatten_unflatten_roundtrip():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    keys = list(state)
    vec = merging.flatten_state(state, keys)
    params = [p for _, p in m.named_parameters()]
    merging.unflatten_into(vec, params)
    for k, p in m.named_parameters():
        assert torch.equal(p.data, state[k])
    with pytest.raises(ValueError):
        merging.unflatten_into(torch.cat([vec, vec[:1]]), params)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_chunks_cover_every_subset_exactly_once(n):
    total = 2**n - 1
    for k in list(range(1, total + 3)) + [4 * total]:
        seen = [m for c in range(k) for m in subsets.chunk_range(n, c, k)]
        assert sorted(seen) == list(range(1, total + 1)), (n, k)
        sizes = [len(subsets.chunk_range(n, c, k)) for c in range(k)]
        assert max(sizes) - min(sizes) <= 1


def test_chunk_arguments_are_checked():
    with pytest.raises(ValueError):
        subsets.chunk_range(3, 3, 3)
    with pytest.raises(ValueError):
        subsets.chunk_range(3, 0, 0)


def test_subset_ids_are_sorted_and_enumeration_is_complete():
    names = ["b", "a", "c"]
    ids = {subsets.subset_id(s) for s in subsets.all_subsets(names)}
    expected = {"+".join(sorted(c)) for r in range(1, 4) for c in itertools.combinations(names, r)}
    assert ids == expected
    assert subsets.subset_id(["z", "a"]) == "a+z"
    assert subsets.parse_subset("a+z") == ["a", "z"]
    assert sorted(["a+b+c", "b", "a+b"], key=subsets.sort_key) == ["b", "a+b", "a+b+c"]
