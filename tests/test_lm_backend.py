"""The causal_lm backend and the text sources on a tiny local Llama (nothing is downloaded)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import lm_tiny  # noqa: E402
from lm_tiny import base_dir, offline  # noqa: E402,F401 (shared fixtures)
from mergemix import io, merging  # noqa: E402
from mergemix.backends import get_backend  # noqa: E402
from mergemix.backends.causal_lm import IGNORE, encode_chat, special_ids  # noqa: E402
from mergemix.data.prepared import load_prepared, prepare_dataset  # noqa: E402

SPLIT = {"seed": 0, "val": 0.2, "test": 0.3, "val_from_train": 0.25, "val_cap": 100}
HP = {"epochs": 1, "lr": 0.01, "batch_size": 4, "optimizer": "adamw", "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def _offline(offline):
    yield


def backend(base_dir, **params):
    return get_backend({"name": "causal_lm", "params": {"model": str(base_dir), **params}}, threads=1, device="cpu")


@pytest.fixture(scope="module")
def pretrained(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "model.safetensors"
    manifest = backend(base_dir).fetch_pretrained(out)
    return out, manifest


def prepared_chat(tmp_path, name, pairs):
    path = lm_tiny.write_jsonl(tmp_path / f"{name}.jsonl", [lm_tiny.chat(q, a) for q, a in pairs])
    prepare_dataset(name, {"source": "jsonl_chat", "path": str(path)}, SPLIT, tmp_path / "data" / name)
    return load_prepared(tmp_path / "data" / name)


def prepared_target(tmp_path):
    spec = {"source": "benchmarks", "benchmarks": lm_tiny.write_benchmarks(tmp_path / "bench")}
    prepare_dataset("skill", spec, SPLIT, tmp_path / "data" / "skill")
    return load_prepared(tmp_path / "data" / "skill")


# --- tokenisation ------------------------------------------------------------------------------
def test_loss_mask_covers_assistant_turns_only():
    tok = lm_tiny.make_tokenizer()
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "四 4"},
        {"role": "user", "content": "copy ab"},
        {"role": "assistant", "content": "ab"},
    ]
    ids, labels = encode_chat(tok, msgs, 10_000)
    assert len(ids) == len(labels)
    # contiguous labelled runs, decoded: exactly the assistant contents with their end-of-turn token
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == t
            cur.append(t)
    runs.append(cur) if cur else None
    assert [tok.decode(r) for r in runs] == ["四 4<|eot_id|>", "ab<|eot_id|>"]
    # truncation to the context length cuts both ids and labels
    ids2, labels2 = encode_chat(tok, msgs, 12)
    assert ids2 == ids[:12] and labels2 == labels[:12] and all(l == IGNORE for l in labels2)


def test_missing_chat_template_is_a_clear_error():
    tok = lm_tiny.make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(tok, [lm_tiny.chat("a", "b")["messages"][0]], 10)


# --- fetch / load ------------------------------------------------------------------------------
def test_fetch_and_load_offline_roundtrip(base_dir, pretrained):
    out, manifest = pretrained
    assert manifest["kind"] == "pretrained" and manifest["origin"] == {"local": str(base_dir.resolve())}
    state, saved = io.load_model(out)
    assert (out.parent / saved["base_model"]).resolve() == base_dir.resolve()
    # IA3 on k_proj (32 out), v_proj (32 out) and down_proj (feed-forward: 128 in), 2 layers; starts at 1
    assert sum(v.numel() for v in state.values()) == 2 * (32 + 32 + 128) == manifest["adapter_parameters"]
    assert all(torch.equal(v, torch.ones_like(v)) for v in state.values())
    assert all("ia3_l" in k for k in state)
    be = backend(base_dir)
    model = be.load_pretrained(out)
    live = be.merge_params(model)
    assert set(live) == set(state)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) > 10 * len(
        merging.flatten_state(state, list(state))
    )


def test_fetch_from_the_hub_pins_the_resolved_commit(base_dir, tmp_path, monkeypatch):
    """The hub path with huggingface_hub stood in by a local copy: files land beside theta_0."""
    import shutil
    import types

    import huggingface_hub

    calls = {}
    monkeypatch.setattr(
        huggingface_hub.HfApi, "model_info", lambda self, repo, revision=None: types.SimpleNamespace(sha="c0ffee")
    )

    def fake_snapshot(repo_id, revision, local_dir, allow_patterns):
        calls.update(repo_id=repo_id, revision=revision)
        shutil.copytree(base_dir, local_dir)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = tmp_path / "models" / "pretrained" / "model.safetensors"
    be = get_backend({"name": "causal_lm", "params": {"model": "org/tiny-llama", "revision": "main"}}, device="cpu")
    manifest = be.fetch_pretrained(out)
    assert calls == {"repo_id": "org/tiny-llama", "revision": "c0ffee"}
    assert manifest["base_model"] == "base" and manifest["origin"]["resolved_revision"] == "c0ffee"
    model = be.load_pretrained(out)  # from models/pretrained/base, offline
    assert set(be.merge_params(model)) == set(io.load_model(out)[0])


def test_lora_option(base_dir, tmp_path):
    be = backend(base_dir, adapter="lora", lora_r=2, target_modules=["q_proj", "v_proj"])
    manifest = be.fetch_pretrained(tmp_path / "model.safetensors")
    state, _ = io.load_model(tmp_path / "model.safetensors")
    assert all("lora_" in k for k in state) and manifest["adapter_parameters"] == sum(v.numel() for v in state.values())
    model = be.load_pretrained(tmp_path / "model.safetensors")
    for k, p in be.merge_params(model).items():
        assert torch.equal(p.detach(), state[k])  # the saved random init, not a new one


def test_missing_base_folder_names_the_fix(base_dir, tmp_path):
    out = tmp_path / "pre" / "model.safetensors"
    backend(base_dir).fetch_pretrained(out)
    m = io.read_json(out.with_suffix(".json"))
    m["base_model"] = "does-not-exist"
    io.write_json(out.with_suffix(".json"), m)
    with pytest.raises(FileNotFoundError, match="rerun fetch_pretrained"):
        backend(base_dir).load_pretrained(out)


# --- training and merging ----------------------------------------------------------------------
def test_finetune_trains_only_the_adapter_and_lowers_the_loss(base_dir, pretrained, tmp_path):
    be = backend(base_dir)
    model = be.load_pretrained(pretrained[0])
    data = prepared_chat(tmp_path, "copy", lm_tiny.copying(24))
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    before = be.mean_loss(model, be._encode(data, "val"))
    hp = {**HP, "epochs": 3}
    metrics = be.finetune(model, [data], hp)
    assert metrics["n_train"] == len(data.indices["train"]) == 18
    assert metrics["val_loss"] < before - 0.05
    assert all(torch.equal(frozen[k], p) for k, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.allclose(p, torch.ones_like(p)) for p in be.merge_params(model).values())


def test_weighted_mixture_draws_the_sets_in_proportion(base_dir, pretrained, tmp_path, monkeypatch):
    """merge_eval.strategy: weights fine-tunes with mixture_weights: the causal LM's examples are
    drawn per set in those proportions, for the steps of the weighted sets' plain union."""
    from mergemix.backends import training

    be = backend(base_dir)
    model = be.load_pretrained(pretrained[0])
    data = [
        prepared_chat(tmp_path, "copy", lm_tiny.copying(24)),
        prepared_chat(tmp_path, "rev", lm_tiny.reversal(24)),
        prepared_chat(tmp_path, "add", lm_tiny.arithmetic(24)),
    ]
    seen = []
    real_fit = training.fit

    def spy(params, n, step_loss, hp, **kw):
        return real_fit(params, n, lambda idx: seen.extend(idx.tolist()) or step_loss(idx), hp, **kw)

    monkeypatch.setattr("mergemix.backends.causal_lm.fit", spy)
    hp = {**HP, "epochs": 20, "batch_size": 6, "mixture_weights": {"copy": 0.75, "rev": 0.25}}
    metrics = be.finetune(model, data, hp)
    assert metrics["steps"] == 20 * 6  # 36 examples of copy and rev per epoch, batches of 6: add is left out
    sizes = [len(d.indices["train"]) for d in data]
    src = [0 if i < sizes[0] else 1 if i < sizes[0] + sizes[1] else 2 for i in seen]
    share = [src.count(k) / len(src) for k in range(3)]
    assert share[2] == 0 and abs(share[0] - 0.75) < 0.05  # 720 draws: sd of the share ~0.016


def test_gradient_accumulation_matches_one_batch(base_dir, pretrained, tmp_path):
    data = prepared_chat(tmp_path, "rev", lm_tiny.reversal(12))
    states = []
    for micro in (4, 1, 3):
        be = backend(base_dir, micro_batch_size=micro)
        model = be.load_pretrained(pretrained[0])
        be.finetune(model, [data], HP)
        states.append(merging.flatten_state(be.state_to_save(model), sorted(be.merge_params(model))))
    assert not torch.allclose(states[0], torch.ones_like(states[0]))
    assert torch.allclose(states[0], states[1], atol=1e-5) and torch.allclose(states[0], states[2], atol=1e-5)


def test_merged_adapter_equals_peft_add_weighted_adapter(base_dir, pretrained, tmp_path):
    be = backend(base_dir)
    thetas = []
    for name, pairs in (("copy", lm_tiny.copying(16)), ("add", lm_tiny.arithmetic(16))):
        model = be.load_pretrained(pretrained[0])
        be.finetune(model, [prepared_chat(tmp_path, name, pairs)], HP)
        thetas.append(be.state_to_save(model))
    keys = sorted(thetas[0])
    merged = merging.merge("uniform", torch.stack([merging.flatten_state(t, keys) for t in thetas]))
    # ours: the merged vector written into the live model, as merge-eval does
    live = be.load_pretrained(pretrained[0])
    params = be.merge_params(live)
    merging.unflatten_into(merged, [params[k] for k in keys])
    # peft's: both adapters loaded under their own names, combined with weights 0.5/0.5
    ref = be.load_pretrained(pretrained[0])
    ref.add_adapter("a", be.peft_config())
    ref.add_adapter("b", be.peft_config())
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for tag, theta in zip("ab", thetas):
            for k, v in theta.items():
                ref_params[k.replace(".default", f".{tag}")].copy_(v)
    ref.add_weighted_adapter(["a", "b"], [0.5, 0.5], "avg")
    ref.set_adapter("avg")
    ref_params = dict(ref.named_parameters())
    for k in keys:
        assert torch.allclose(params[k].detach(), ref_params[k.replace(".default", ".avg")].detach(), atol=1e-7), k
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        assert torch.allclose(live(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


# --- evaluation and embeddings -----------------------------------------------------------------
def test_batched_left_padded_generation_matches_one_at_a_time(base_dir, pretrained):
    be = backend(base_dir, eval_batch_size=3)
    model = be.load_pretrained(pretrained[0])
    prompts = [[{"role": "user", "content": q}] for q, _ in lm_tiny.reversal(5)] + [
        [{"role": "user", "content": "1+2="}]
    ]
    batched = be.generate(model, prompts, 6)
    single = [be.generate(model, [p], 6)[0] for p in prompts]
    assert batched == single
    assert len(set(len(p[0]["content"]) for p in prompts)) > 1  # the batch really needed padding


def test_evaluate_benchmark_group_is_the_mean_of_benchmark_metrics(base_dir, pretrained, tmp_path):
    from mergemix import text_metrics

    be = backend(base_dir)
    model = be.load_pretrained(pretrained[0])
    target = prepared_target(tmp_path)
    assert len(target.indices["val"]) == 8 and len(target.indices["test"]) == 12
    per = be.benchmark_scores(model, target, "test")
    assert set(per) == {"add", "rev"}
    assert be.evaluate(model, target, "test") == pytest.approx(np.mean(list(per.values())))
    # recompute one benchmark by hand from the generations
    recs = [r for r in target.split("test")[0] if r["benchmark"] == "rev"]
    preds = be.generate(model, [[{"role": "user", "content": r["prompt"]}] for r in recs], 4)
    assert per["rev"] == pytest.approx(text_metrics.char_f1(preds, [r["references"] for r in recs]))
    with pytest.raises(ValueError, match="not a benchmark target"):
        be.evaluate(model, prepared_chat(tmp_path, "copy", lm_tiny.copying(8)), "val")


def test_embeddings_average_non_special_non_padding_tokens(base_dir, pretrained, tmp_path):
    be = backend(base_dir, embed_batch_size=4)
    model = be.load_pretrained(pretrained[0])
    data = prepared_chat(tmp_path, "rev", lm_tiny.reversal(10))
    emb = be.embed(model, data, "val")
    assert emb.dtype == np.float32 and emb.shape == (10, 64)  # 'full': every sample of a training dataset
    be_split = backend(base_dir, embed_training_data="split")
    emb_split = be_split.embed(be_split.load_pretrained(pretrained[0]), data, "val")
    assert emb_split.shape == (len(data.indices["val"]), 64)
    # by hand, one sample at a time (no padding): mean of the last layer over non-special tokens
    tok = be.tokenizer
    special = special_ids(tok)
    for i in (0, 7):
        rec = data.x[i]
        ids = tok(tok.apply_chat_template(rec["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        keep = torch.tensor([t not in special for t in ids])
        assert 0 < keep.sum() < len(ids)
        assert np.allclose(emb[i], h[keep].mean(0).numpy(), atol=1e-5)
    target = prepared_target(tmp_path)
    assert be.embed(model, target, "val").shape == (8, 64)  # targets: their validation split


# --- sources -----------------------------------------------------------------------------------
def test_hf_chat_from_a_saved_dataset_with_filters_and_first_n(tmp_path):
    from mergemix import stages

    saved = lm_tiny.save_hf_dataset(tmp_path / "saved", lm_tiny.arithmetic(30), lm_tiny.copying(30))
    spec = {
        "source": "hf_chat",
        "path": str(saved),
        "filters": {"lang": "ja"},
        "first_n": 20,
        "messages": [{"role": "user", "field": "question"}, {"role": "assistant", "field": "answer"}],
        "system": "answer with a number",
    }
    info = stages.download("arith", spec, tmp_path / "dl")
    assert info["n_rows"] == 60 and set(info["columns"]) == {"question", "answer", "lang"}
    stages.prepare("arith", spec, SPLIT, tmp_path / "data", local_dir=tmp_path / "dl")
    d = load_prepared(tmp_path / "data")
    assert len(d.x) == 20 and len(d.indices["val"]) == 5 and len(d.indices["test"]) == 0
    expected = lm_tiny.arithmetic(30)[:20]  # the first 20 'ja' rows, in order
    assert [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in d.x] == expected
    assert all(r["messages"][0] == {"role": "system", "content": "answer with a number"} for r in d.x)
    with pytest.raises(FileNotFoundError, match="download_data"):
        stages.prepare("arith", spec, SPLIT, tmp_path / "data2", local_dir=tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"filter column\(s\) \['language'\]"):
        stages.prepare(
            "arith", {**spec, "filters": {"language": "ja"}}, SPLIT, tmp_path / "data4", local_dir=tmp_path / "dl"
        )
    bad = {**spec, "messages": [{"role": "user", "field": "instruction"}, {"role": "assistant", "field": "answer"}]}
    with pytest.raises(ValueError, match="'instruction' is not a column"):
        stages.prepare("arith", bad, SPLIT, tmp_path / "data3", local_dir=tmp_path / "dl")


def test_jsonl_chat_with_a_sharegpt_conversation_mapping(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "source": s}
        for (q, a), s in zip(lm_tiny.copying(12), ["translations", "slimorca"] * 6)
    ]
    path = lm_tiny.write_jsonl(tmp_path / "orca.jsonl", rows)
    spec = {
        "source": "jsonl_chat",
        "path": str(path),
        "filters": {"source": "slimorca"},
        "conversation": {
            "field": "conversations",
            "role_key": "from",
            "content_key": "value",
            "roles": {"human": "user", "gpt": "assistant"},
        },
    }
    prepare_dataset("orca", spec, SPLIT, tmp_path / "d")
    d = load_prepared(tmp_path / "d")
    assert len(d.x) == 6 and [m["role"] for m in d.x[0]["messages"]] == ["user", "assistant"]
    assert d.x[0]["messages"][1]["content"] == lm_tiny.copying(12)[1][1]
    unmapped = {**spec, "conversation": {**spec["conversation"], "roles": {}}}
    with pytest.raises(ValueError, match="conversation.roles"):
        prepare_dataset("orca", unmapped, SPLIT, tmp_path / "e")


def test_benchmarks_source_splits_and_llm_jp_eval_conversion(tmp_path):
    from mergemix.data.text import _main

    for split, n in (("dev", 3), ("test", 5)):
        src = tmp_path / "llmjp" / split / "jnli.json"
        src.parent.mkdir(parents=True)
        src.write_text(
            json.dumps(
                {
                    "instruction": "前提と仮説の関係を答えてください。",
                    "output_length": 3,
                    "metrics": ["exact_match"],
                    "few_shots": [],
                    "samples": [{"input": f"前提：{i}\n仮説：{i}", "output": "entailment"} for i in range(n)],
                },
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )
    assert _main([str(tmp_path / "llmjp"), str(tmp_path / "bench"), "jnli"]) == 0
    entry = {
        "name": "jnli",
        "dev": str(tmp_path / "bench/dev/jnli.jsonl"),
        "test": str(tmp_path / "bench/test/jnli.jsonl"),
        "metric": "exact_match",
        "max_new_tokens": 3,
        "system": "前提と仮説の関係を答えてください。",
    }
    spec = {"source": "benchmarks", "benchmarks": [entry], "max_per_benchmark": 4}
    prepare_dataset("nli", spec, SPLIT, tmp_path / "d")
    d = load_prepared(tmp_path / "d")
    assert len(d.indices["val"]) == 3 and len(d.indices["test"]) == 4 and len(d.indices["train"]) == 0
    r = d.split("test")[0][0]
    assert r["references"] == ["entailment"] and r["prompt"].startswith("前提") and r["system"] == entry["system"]
    with pytest.raises(KeyError, match="available"):
        prepare_dataset("nli", {**spec, "benchmarks": [{**entry, "metric": "rouge"}]}, SPLIT, tmp_path / "e")


# --- lm-evaluation-harness adapter (optional extra) --------------------------------------------
def write_copy_mc_task(folder) -> list[dict]:
    """A local multiple-choice lm-eval task, ``copy_mc``, in ``folder/tasks`` over a JSON-lines file; its rows."""
    words = [w for _, w in lm_tiny.copying(12, seed=7)]
    rows = [{"question": f"copy {w}", "choices": [w, w[::-1] + "x"], "label": 0} for w in words]
    lm_tiny.write_jsonl(folder / "copy_mc.jsonl", rows)
    (folder / "tasks").mkdir()
    (folder / "tasks" / "copy_mc.yaml").write_text(
        "task: copy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'copy_mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return rows


@pytest.mark.slow
def test_lm_eval_indexes_only_the_local_tasks_when_they_are_all_there(tmp_path):
    """The task index is built once per process, and lm-eval's own 14,000-odd tasks are indexed
    only when a named task is not in the target's include_path."""
    pytest.importorskip("lm_eval")
    from mergemix.lm_eval_adapter import task_manager

    write_copy_mc_task(tmp_path)
    folder = str(tmp_path / "tasks")
    local = task_manager(folder, ["copy_mc"])
    assert "copy_mc" in local.all_tasks and "arc_easy" not in local.all_tasks
    assert task_manager(folder, ["copy_mc"]) is local
    listed = task_manager([folder], ("copy_mc",))  # include_path may list folders, as lm-eval's does
    assert "copy_mc" in listed.all_tasks and "arc_easy" not in listed.all_tasks
    both = task_manager(folder, ["copy_mc", "arc_easy"])  # a built-in task: lm-eval's own are indexed too
    assert {"copy_mc", "arc_easy"} <= set(both.all_tasks)
    assert task_manager(folder, ["arc_easy"]) is both  # one index per folder, whatever the names


@pytest.mark.slow
def test_lm_eval_target_scores_the_live_model(base_dir, pretrained, tmp_path):
    """A local multiple-choice task through lm-eval on the in-memory model, against a hand computation."""
    pytest.importorskip("lm_eval")
    rows = write_copy_mc_task(tmp_path)
    spec = {
        "source": "lm_eval",
        "tasks": [{"name": "copy_mc", "metric": "acc"}],
        "val_limit": 5,
        "test_limit": 7,
        "include_path": str(tmp_path / "tasks"),
    }
    prepare_dataset("mc", spec, SPLIT, tmp_path / "d")
    target = load_prepared(tmp_path / "d")
    be = backend(base_dir)
    model = be.load_pretrained(pretrained[0])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a non-trivial adapter, written into the live model as merge-eval does
        for p in be.merge_params(model).values():
            p.copy_(1 + 0.8 * torch.randn(p.shape, generator=gen))
    tok = be.tokenizer

    def logprob(context, continuation):
        ctx, cont = tok.encode(context, add_special_tokens=False), tok.encode(continuation, add_special_tokens=False)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        return sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    def by_hand(docs):
        return np.mean(
            [max(range(2), key=lambda c: logprob(d["question"], " " + d["choices"][c])) == d["label"] for d in docs]
        )

    val, test = be.evaluate(model, target, "val"), be.evaluate(model, target, "test")
    assert val == pytest.approx(by_hand(rows[:5])) and test == pytest.approx(by_hand(rows[5:12]))
    assert 0 < by_hand(rows) < 1  # the task discriminates between models
    # similarity baselines: the validation documents, embedded as question + correct choice
    emb = be.embed(model, target, "val")
    # the same text as a benchmark target embeds identically
    lm_tiny.write_jsonl(
        tmp_path / "mc.jsonl", [{"prompt": r["question"], "references": [r["choices"][0]]} for r in rows[:5]]
    )
    spec = {
        "source": "benchmarks",
        "benchmarks": [
            {
                "name": "mc",
                "dev": str(tmp_path / "mc.jsonl"),
                "test": str(tmp_path / "mc.jsonl"),
                "metric": "exact_match",
                "max_new_tokens": 2,
            }
        ],
    }
    prepare_dataset("mcb", spec, SPLIT, tmp_path / "b")
    assert emb.shape == (5, 64) and np.allclose(emb, be.embed(model, load_prepared(tmp_path / "b"), "val"), atol=1e-6)
