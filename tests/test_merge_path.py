"""The merge path of merge-eval: Gray-code enumeration, the in-place running sum, weights written
into the live model, evaluation settings (batch size, bf16), and merge_eval.test: selected.

The pure parts run on random tensors; the rest on a tiny convnet really trained on digits (and
the tiny CLIP of tests/clip_fixtures.py where open_clip is installed)."""

import math

import pandas as pd
import pytest
import torch

from conftest import DIGITS_BACKEND, DIGITS_HP, DIGITS_SPLIT, train_digits
from mergemix import merging, stages, subsets
from mergemix.backends import get_backend
from mergemix.data.prepared import load_prepared
from mergemix.merge_eval import MergeEvaluator
from mergemix.settings import Merge, Search

BACKEND, SPLIT, HP = DIGITS_BACKEND, DIGITS_SPLIT, DIGITS_HP  # conftest.train_digits trains with these
MERGE = Merge("uniform", {})
CANDS = ["mirror", "noise", "rotate", "squeeze"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as merge-eval jobs run on CPU (small tensor ops contend badly on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- pure: Gray code and the running sum ----------------------------------------------------------


@pytest.mark.parametrize("n,chunks", [(1, 1), (4, 1), (5, 3), (7, 4), (3, 9)])
def test_gray_chunks_visit_every_subset_once_one_candidate_per_step(n, chunks):
    parts = [subsets.gray_chunk(n, k, chunks) for k in range(chunks)]
    pairs = [p for part in parts for p in part]
    masks = [m for _, m in pairs]
    assert sorted(masks) == list(subsets.all_masks(n))  # every non-empty subset exactly once
    assert [o for o, _ in pairs] == list(range(2**n - 1))  # order: the position in the enumeration
    for a, b in zip(masks, masks[1:]):  # across chunk boundaries too
        assert subsets.popcount(a ^ b) == 1


def test_running_sum_over_a_long_gray_walk_equals_a_fresh_average():
    torch.manual_seed(0)
    n = 12  # 4,095 steps, one add or subtract each
    thetas = torch.randn(n, 3000) * 0.05 + torch.randn(3000)  # fine-tuned models: near a common point
    walk = subsets.gray_chunk(n, 0, 1)

    def worst_error(rs):
        worst, ops = 0.0, 0
        for _, mask in walk:
            before = rs.row_ops
            total = rs.move_to(mask)
            ops += rs.row_ops - before
            idx = [i for i in range(n) if mask >> i & 1]
            fresh = thetas[idx].double().mean(0)  # the exact average, rounded once
            worst = max(worst, (total.double() / len(idx) - fresh).abs().max().item())
        return worst, ops

    # float32 (the CPU default): adding then subtracting a row leaves rounding; re-anchoring every
    # 64 row operations keeps the average within a few ulps of the fresh one (values up to ~5 here)
    rs = merging.RunningSum(thetas)
    assert rs.sum.dtype == torch.float32 and rs.reanchor_every == 64
    worst, ops = worst_error(rs)
    assert worst < 2e-5, worst
    assert 2**n - 1 <= ops < 1.1 * (2**n - 1)  # about one row operation per step (+ re-anchoring, exact singletons)
    drift, _ = worst_error(merging.RunningSum(thetas, reanchor_every=10**9))
    assert drift > 5 * worst  # what re-anchoring is for
    # float64 (the GPU default): float32 rows add up exactly, adding and subtracting leaves no trace
    exact, _ = worst_error(merging.RunningSum(thetas, dtype=torch.float64))
    assert exact < 1e-12, exact
    # the merged state written to float32 parameters equals a fresh float32 average to rounding
    mask = walk[-1][1]
    idx = [i for i in range(n) if mask >> i & 1]
    live = merging.LiveParams([torch.zeros(3000)])
    live.write_linear(rs.move_to(mask), 1.0 / len(idx))
    assert torch.allclose(live.params[0], thetas[idx].mean(0), rtol=0, atol=1e-6)


def test_running_sum_moves_between_arbitrary_subsets_and_copies_singletons_exactly():
    torch.manual_seed(1)
    thetas = torch.randn(6, 100)
    rs = merging.RunningSum(thetas)
    g = torch.Generator().manual_seed(0)
    for mask in torch.randint(1, 64, (300,), generator=g).tolist():
        rs.move_to(mask)
        idx = [i for i in range(6) if mask >> i & 1]
        assert torch.allclose(rs.sum, thetas[idx].sum(0), rtol=0, atol=1e-5)
        assert rs.k == len(idx)
    rs.move_to(0b000111)
    rs.move_to(0b000100)
    assert torch.equal(rs.sum, thetas[2])
    with pytest.raises(ValueError, match="row 6"):
        rs.move_to(0b1000000)


def test_linear_methods_match_their_reference_merge():
    torch.manual_seed(2)
    thetas, theta0 = torch.randn(5, 40), torch.randn(40)
    for method, options in [("uniform", {}), ("task_arithmetic", {"scale": 0.3}), ("task_arithmetic", {})]:
        for mask in (0b1, 0b10110, 0b11111):
            idx = [i for i in range(5) if mask >> i & 1]
            a, b = merging.linear_coefficients(method, len(idx), **options)
            got = a * thetas[idx].sum(0) + b * theta0
            assert torch.allclose(got, merging.merge(method, thetas[idx], theta0, **options), atol=1e-5)


def test_live_params_write_into_the_model_without_new_storage():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    live = merging.LiveParams(params)
    assert live.flat is not None and all(torch.equal(p, q) for p, q in zip(params, before))  # values kept
    ptrs = [p.data_ptr() for p in params]
    total, theta0 = torch.randn(live.numel), torch.randn(live.numel)
    live.write_linear(total, 0.25, -0.5, theta0)
    assert torch.allclose(torch.cat([p.detach().reshape(-1) for p in params]), 0.25 * total - 0.5 * theta0)
    assert [p.data_ptr() for p in params] == ptrs  # written in place
    x = torch.randn(2, 4)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    merging.unflatten_into(0.25 * total - 0.5 * theta0, list(ref.parameters()))
    assert torch.allclose(model(x), ref(x))  # the model computes with the views
    # mixed dtypes: written tensor by tensor
    mixed = [torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2)]
    live = merging.LiveParams(mixed)
    assert live.flat is None
    live.write_linear(torch.arange(7.0), 2.0)
    assert mixed[0].tolist() == [0.0, 2.0, 4.0] and mixed[1].reshape(-1).tolist() == [6.0, 8.0, 10.0, 12.0]


# --- the engine on a tiny convnet ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_path")
    train_digits(d, CANDS)
    return d


def _models(d):
    return {n: str(d / f"ft/{n}/model.safetensors") for n in CANDS}


def test_incremental_engine_scores_equal_the_from_scratch_path(trained):
    target = load_prepared(trained / "data/shift")
    fast = MergeEvaluator(get_backend(BACKEND), trained / "pre/model.safetensors", _models(trained))
    slow = MergeEvaluator(get_backend(BACKEND), trained / "pre/model.safetensors", _models(trained), incremental=False)
    assert fast.running is not None and slow.running is None and fast.live.flat is not None
    pairs = subsets.gray_chunk(len(CANDS), 0, 1)
    ptr = fast.live.flat.data_ptr()
    a = fast.run(target, [m for _, m in pairs], [o for o, _ in pairs])
    b = slow.run(target, [m for _, m in pairs], [o for o, _ in pairs])
    assert fast.live.flat.data_ptr() == ptr  # the live model's storage was never replaced
    assert fast.running.row_ops <= len(pairs) + len(CANDS)  # one add/subtract per step (+ exact singletons)
    pd.testing.assert_frame_equal(a, b)
    for (_, mask), (_, row) in zip(pairs, a.iterrows()):  # the live weights are the average
        fast.load_subset(mask)
        slow.load_subset(mask)
        for p, q in zip(fast.params, slow.params):
            assert torch.allclose(p, q, atol=1e-6)
    # task arithmetic rides the same running sum
    opts = {"scale": 0.4}
    ta = MergeEvaluator(
        get_backend(BACKEND), trained / "pre/model.safetensors", _models(trained), "task_arithmetic", opts
    )
    ref = MergeEvaluator(
        get_backend(BACKEND),
        trained / "pre/model.safetensors",
        _models(trained),
        "task_arithmetic",
        opts,
        incremental=False,
    )
    for _, mask in pairs:
        ta.load_subset(mask)
        ref.load_subset(mask)
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(ta.params, ref.params))


def test_exhaustive_chunks_in_gray_order_cover_every_subset_and_gather(trained, tmp_path):
    parts = []
    for k in range(3):
        parts.append(tmp_path / f"c{k}.csv")
        stages.merge_eval(
            BACKEND, MERGE, trained / "pre/model.safetensors", _models(trained), trained / "data/shift", k, 3, parts[-1]
        )
    rows = pd.concat([pd.read_csv(p) for p in parts])
    assert sorted(rows["order"]) == list(range(15))
    for _, r in rows.iterrows():  # order is the position in the Gray-code enumeration
        assert subsets.names_to_mask(subsets.parse_subset(r["subset"]), CANDS) == subsets.gray(r["order"] + 1)
    out = stages.gather(parts, CANDS, tmp_path / "all.csv")
    assert len(out) == 15 and out["test_acc"].notna().all()
    # the same scores as one job evaluating the subsets in mask order from scratch
    ev = MergeEvaluator(get_backend(BACKEND), trained / "pre/model.safetensors", _models(trained), incremental=False)
    ref = ev.run(load_prepared(trained / "data/shift"), range(1, 16)).set_index("subset")
    got = out.set_index("subset")
    pd.testing.assert_frame_equal(got[["val_acc", "test_acc"]], ref.loc[got.index, ["val_acc", "test_acc"]])


def test_eval_batch_size_does_not_change_scores(trained):
    target = load_prepared(trained / "data/shift")
    scores = []
    for bs in (None, 7, 64):
        b = get_backend(BACKEND)
        b.configure_eval(bs)
        ev = MergeEvaluator(b, trained / "pre/model.safetensors", _models(trained))
        scores.append([ev.evaluate(target, s, m) for m in (0b0011, 0b1101) for s in ("val", "test")])
    assert scores[0] == scores[1] == scores[2]
    with pytest.raises(ValueError, match="merge_eval.eval_batch_size"):
        get_backend(BACKEND).configure_eval(0)
    with pytest.raises(ValueError, match="merge_eval.precision"):
        get_backend(BACKEND).configure_eval(None, "fp16")


def test_evaluation_runs_in_inference_mode_with_the_split_preloaded(trained, monkeypatch):
    b = get_backend(BACKEND)
    ev = MergeEvaluator(b, trained / "pre/model.safetensors", _models(trained))
    target = load_prepared(trained / "data/shift")
    seen = []
    hook = ev.model.register_forward_hook(lambda m, i, o: seen.append((torch.is_inference_mode_enabled(), i[0].dtype)))
    ev.evaluate(target, "val", 0b0101)
    hook.remove()
    assert seen and all(mode for mode, _ in seen)
    x, _ = b._split(target, "val")
    assert not x.is_inference()  # cached as a normal tensor: a later training step could use it
    loaded = dict(b._tensors)
    monkeypatch.setattr(target, "split", lambda *a, **k: pytest.fail("the split is read again"))
    ev.evaluate(target, "val", 0b0110)
    assert dict(b._tensors) == loaded


def _accuracies(backend_spec, pretrained, models, data, precision, masks):
    b = get_backend(backend_spec)
    b.configure_eval(None, precision)
    ev = MergeEvaluator(b, pretrained, models)
    return [ev.evaluate(d, s, m) for m in masks for d in data for s in ("val", "test")]


def test_bf16_autocast_agrees_with_fp32_within_half_a_point(trained):
    data = [load_prepared(trained / "data" / n) for n in ("shift", "clean", *CANDS)]
    masks = [1, 0b0110, 0b1111]
    fp32 = _accuracies(BACKEND, trained / "pre/model.safetensors", _models(trained), data, "fp32", masks)
    bf16 = _accuracies(BACKEND, trained / "pre/model.safetensors", _models(trained), data, "bf16", masks)
    auto = _accuracies(BACKEND, trained / "pre/model.safetensors", _models(trained), data, "auto", masks)
    assert auto == fp32  # smallcnn evaluates in fp32 unless asked
    n = sum(len(d.indices[s]) for d in data for s in ("val", "test")) * len(masks)
    assert n > 2000
    weights = [len(d.indices[s]) for _ in masks for d in data for s in ("val", "test")]
    pooled = [sum(w * a for w, a in zip(weights, accs)) / sum(weights) for accs in (fp32, bf16)]
    assert abs(pooled[0] - pooled[1]) * 100 <= 0.5, pooled
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) * 100 <= 2.0  # no split moves by more than a few examples
    seen = []
    b = get_backend(BACKEND)
    b.configure_eval(None, "bf16")
    ev = MergeEvaluator(b, trained / "pre/model.safetensors", _models(trained))
    hook = ev.model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ev.evaluate(data[0], "val", 1)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # really autocast on CPU


def test_bf16_on_the_tiny_clip_agrees_with_fp32(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    from clip_fixtures import IMAGE_SIZE, backend_spec, write_image_folder, write_tiny_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = write_tiny_weights(tmp_path / "weights.pt")
    colours = ["red", "green", "blue", "yellow"]
    backend = backend_spec(weights)
    pre = tmp_path / "models/pretrained/model.safetensors"
    stages.fetch_pretrained(backend, pre)
    for name, style, n, seed in [
        ("blobs", "square", 15, 0),
        ("stripes", "stripes", 15, 10),
        ("target", "square", 70, 20),
    ]:
        folder = write_image_folder(tmp_path / "img" / name, colours, n, n, seed, style)
        stages.prepare(
            name,
            {"source": "image_folder", "path": str(folder), "image_size": IMAGE_SIZE},
            {"seed": 0, "val": 0.2, "test": 0.3},
            tmp_path / "data" / name,
        )
        stages.head(backend, pre, tmp_path / "data" / name, pre.parent / "heads" / f"{name}.safetensors")
    hp = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "optimizer": "adamw", "schedule": "cosine", "seed": 0}
    models = {}
    for name in ("blobs", "stripes"):
        models[name] = str(tmp_path / f"ft/{name}/model.safetensors")
        stages.finetune(backend, hp, pre, [tmp_path / "data" / name], models[name])
    data = [load_prepared(tmp_path / "data/target")]
    assert sum(len(data[0].indices[s]) for s in ("val", "test")) >= 200
    fp32 = _accuracies(backend, pre, models, data, "fp32", [1, 2, 3])
    bf16 = _accuracies(backend, pre, models, data, "bf16", [1, 2, 3])
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) * 100 <= 0.5, (fp32, bf16)
    b = get_backend(backend)
    b.configure_eval(None, "bf16")
    ev = MergeEvaluator(b, pre, models)
    seen = []
    hook = ev.model.visual.transformer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ev.evaluate(data[0], "val", 3)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the encoder really ran in bf16 on CPU


# --- merge_eval.test: selected ----------------------------------------------------------------------


def test_selected_scores_test_only_for_the_best_and_the_named_subsets(trained, tmp_path):
    args = (BACKEND, MERGE, trained / "pre/model.safetensors", _models(trained), trained / "data/shift")
    full = [stages.merge_eval(*args, k, 2, tmp_path / f"a{k}.csv") for k in range(2)]
    named = [subsets.subset_id(CANDS), "mirror+noise"]
    sel = [
        stages.merge_eval(*args, k, 2, tmp_path / f"s{k}.csv", test="selected", test_subsets=named) for k in range(2)
    ]
    for a, s in zip(full, sel):
        assert (a["val_acc"] == s["val_acc"]).all() and (a["subset"] == s["subset"]).all()
        has = s[s["test_acc"].notna()]
        assert set(has["subset"]) <= set(named) | {stages.select_best(s)["subset"]}
        assert stages.select_best(s)["subset"] in set(has["subset"])
        assert (has["test_acc"] == a.set_index("subset").loc[has["subset"], "test_acc"].values).all()
    # the chunks' rows (NaN test) pass gather's checks; the chosen subset keeps its test accuracy
    out = stages.gather([tmp_path / "s0.csv", tmp_path / "s1.csv"], CANDS, tmp_path / "sel.csv")
    ref = stages.gather([tmp_path / "a0.csv", tmp_path / "a1.csv"], CANDS, tmp_path / "all.csv")
    assert out["test_acc"].isna().sum() >= 15 - 2 - len(named)
    best, best_ref = stages.select_best(out), stages.select_best(ref)
    assert best["subset"] == best_ref["subset"] and best["test_acc"] == best_ref["test_acc"]
    assert set(named) <= set(out.loc[out["test_acc"].notna(), "subset"])
    # a table whose best row has lost its test accuracy is refused, naming the file
    from mergemix.tables import TableError, read_result_table

    bad = out.copy()
    bad.loc[bad["subset"] == best["subset"], "test_acc"] = float("nan")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(TableError, match=r"bad\.csv.*best subset on val.*no test_acc"):
        read_result_table(tmp_path / "bad.csv", "merge_eval")


def test_merge_eval_cli_passes_the_evaluation_settings(trained, tmp_path):
    import json

    from mergemix.cli import main

    models = [f"{n}={p}" for n, p in _models(trained).items()]
    base = [
        "merge-eval",
        "--backend",
        json.dumps(BACKEND),
        "--merge",
        json.dumps(MERGE.to_dict()),
        "--pretrained",
        str(trained / "pre/model.safetensors"),
        "--models",
        *models,
        "--target",
        str(trained / "data/shift"),
    ]
    assert (
        main(
            [
                *base,
                "--eval",
                json.dumps({"eval_batch_size": 5, "precision": "bf16"}),
                "--test",
                "selected",
                "--test-subsets",
                "mirror+noise",
                "--out",
                str(tmp_path / "sel.csv"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                *base,
                "--eval",
                json.dumps({"eval_batch_size": None, "precision": "fp32"}),
                "--out",
                str(tmp_path / "all.csv"),
            ]
        )
        == 0
    )
    sel, full = pd.read_csv(tmp_path / "sel.csv"), pd.read_csv(tmp_path / "all.csv")
    assert full["test_acc"].notna().all() and len(sel) == len(full) == 15
    assert set(sel.loc[sel["test_acc"].notna(), "subset"]) <= {"mirror+noise", stages.select_best(sel)["subset"]}
    assert abs(sel["val_acc"].mean() - full["val_acc"].mean()) * 100 <= 0.5  # bf16 vs fp32
    assert main([*base, "--eval", json.dumps({"precision": "fp16"}), "--out", str(tmp_path / "bad.csv")]) == 2


def test_selected_search_scores_its_best_subset_only(trained, tmp_path):
    spec = Search("greedy", 12, 0, {})
    args = (BACKEND, MERGE, spec, trained / "pre/model.safetensors", _models(trained), trained / "data/shift")
    a = stages.search(*args, tmp_path / "a.csv", tmp_path / "a.json")
    s = stages.search(*args, tmp_path / "s.csv", tmp_path / "s.json", test="selected")
    ra, rs = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "s.csv")
    assert a["best"] == s["best"] and (ra["val_acc"] == rs["val_acc"]).all()
    assert rs["test_acc"].notna().sum() == 1
    row = rs[rs["test_acc"].notna()].iloc[0]
    assert row["subset"] == s["best"] == stages.select_best(rs)["subset"]
    assert row["test_acc"] == ra.set_index("subset").loc[s["best"], "test_acc"]


def test_analysis_refuses_a_studied_mixture_without_merged_test_accuracy():
    from mergemix.analysis import check_merged_tests, merged_for_correlation
    from mergemix.tables import TableError

    merged = pd.DataFrame(
        {
            "subset": ["a", "b", "a+b"],
            "size": [1, 1, 2],
            "val_acc": [0.5, 0.6, 0.7],
            "test_acc": [0.4, math.nan, 0.8],
            "order": [0, 2, 1],
            "val_examples": [10, 10, 10],
        }
    )
    mix = pd.DataFrame({"subset": ["a", "b", "a+b"], "size": [1, 1, 2], "val_acc": [0.5] * 3, "test_acc": [0.5] * 3})
    merged_c = merged_for_correlation(merged, None)
    assert list(merged_c["subset"]) == ["a", "a+b"]
    with pytest.raises(
        TableError, match=r"me\.csv: no merged test accuracy for 1 fine-tuned mixture.*\(b\).*merge_eval\.test: all"
    ):
        check_merged_tests(merged, merged_c, mix, "me.csv")
    check_merged_tests(merged, merged_c, mix[mix["subset"] != "b"], "me.csv")  # not studied: fine
    # a budgeted search's sample, evaluated apart, supplies what the search left without a test score
    sampled = merged.iloc[[1]].assign(test_acc=0.55)
    merged_c = merged_for_correlation(merged, sampled)
    check_merged_tests(merged, merged_c, mix, "me.csv")
    assert merged_c.set_index("subset").loc["b", "test_acc"] == 0.55


@pytest.mark.parametrize("adapter", ["ia3", "lora"])
def test_the_engine_on_the_tiny_language_model_with_adapters(tmp_path, adapter):
    """Incremental, from scratch, another batch size, and one merged adapter per forward against
    batched adapters (merges_per_forward): the same rows. LoRA merges the products scaling * B @ A."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import lm_tiny
    from conftest import offline_env

    with offline_env():
        base = lm_tiny.make_model_dir(tmp_path / "tiny_llama")
        spec = {"name": "causal_lm", "params": {"model": str(base), "adapter": adapter}}
        pre = tmp_path / "pre/model.safetensors"
        stages.fetch_pretrained(spec, pre)
        split = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
        models = {}
        for name, pairs in (
            ("copy", lm_tiny.copying(16)),
            ("add", lm_tiny.arithmetic(16)),
            ("rev", lm_tiny.reversal(16)),
        ):
            path = lm_tiny.write_jsonl(tmp_path / f"{name}.jsonl", [lm_tiny.chat(q, a) for q, a in pairs])
            stages.prepare(name, {"source": "jsonl_chat", "path": str(path)}, split, tmp_path / "data" / name)
            models[name] = str(tmp_path / f"ft/{name}/model.safetensors")
            stages.finetune(
                spec,
                {"epochs": 1, "lr": 0.01, "batch_size": 4, "optimizer": "adamw", "seed": 0},
                pre,
                [tmp_path / "data" / name],
                models[name],
            )
        stages.prepare(
            "skill",
            {"source": "benchmarks", "benchmarks": lm_tiny.write_benchmarks(tmp_path / "bench")},
            split,
            tmp_path / "data/skill",
        )
        target = load_prepared(tmp_path / "data/skill")
        pairs = subsets.gray_chunk(3, 0, 1)
        runs = []
        for incremental, bs, per_forward in (
            (True, None, 1),
            (False, None, 1),
            (True, 3, 1),
            (True, None, 8),
            (False, 3, 4),
        ):
            b = get_backend(spec, device="cpu")
            b.configure_eval(bs)
            b.merges_per_forward = per_forward
            ev = MergeEvaluator(b, pre, models, incremental=incremental)
            assert (ev.running is not None) == incremental
            runs.append(ev.run(target, [m for _, m in pairs], [o for o, _ in pairs]))
        assert ev.live.flat is not None  # the merged tensors are views of one flat buffer
        if adapter == "lora":  # merged in the space of the dense updates, zero for the pre-trained adapter
            assert not ev.theta0.any() and ev.thetas.shape[1] == sum(p.numel() for p in ev.params)
        for run in runs[1:]:
            pd.testing.assert_frame_equal(runs[0], run, atol=1e-9, rtol=0)
        assert runs[0]["val_acc"].nunique() > 1  # the merged adapters differ, so equality says something
