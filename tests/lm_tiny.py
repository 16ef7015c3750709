"""Local stand-ins for the language study, built in code (nothing is downloaded).

* a byte-level BPE tokenizer with no merges (every UTF-8 byte is a token) and a Llama-3 style
  chat template whose turns end with ``<|eot_id|>`` (also the EOS token, as in Llama-3-Instruct);
* a 2-layer ``LlamaConfig`` model saved with ``save_pretrained``;
* synthetic instruction datasets (arithmetic, reversal, copying) as JSONL chats and as a saved
  ``datasets`` dataset with extra columns for filters;
* a benchmark group (two JSONL benchmarks with dev and test files).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        additional_special_tokens=SPECIAL,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_dir(path, seed: int = 0) -> Path:
    """Save a tiny Llama and the tokenizer to ``path`` (a local model folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _word(rng, lo=3, hi=6):
    return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(lo, hi)))


def arithmetic(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def reversal(n, seed=1):
    rng = random.Random(seed)
    return [(f"reverse {w}", w[::-1]) for w in (_word(rng) for _ in range(n))]


def copying(n, seed=2):
    rng = random.Random(seed)
    return [(f"copy {w}", w) for w in (_word(rng) for _ in range(n))]


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def save_hf_dataset(path, pairs, other_pairs):
    """A ``datasets`` dataset with columns question/answer/lang: ``pairs`` are lang 'ja', the
    ``other_pairs`` lang 'en' and interleaved, so a filter on lang really selects rows."""
    import datasets

    rows = []
    for i in range(max(len(pairs), len(other_pairs))):
        if i < len(pairs):
            rows.append({"question": pairs[i][0], "answer": pairs[i][1], "lang": "ja"})
        if i < len(other_pairs):
            rows.append({"question": other_pairs[i][0], "answer": other_pairs[i][1], "lang": "en"})
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(path))
    return Path(path)


def write_benchmarks(root, n_dev=4, n_test=6) -> list[dict]:
    """Two benchmarks (addition with a numeric metric, reversal with char-F1), dev and test files."""
    root = Path(root)
    out = []
    for name, gen, metric, seed in (("add", arithmetic, "exact_match_figure", 10), ("rev", reversal, "char_f1", 11)):
        pairs = gen(n_dev + n_test, seed=seed)
        for split, rows in (("dev", pairs[:n_dev]), ("test", pairs[n_dev:])):
            write_jsonl(root / split / f"{name}.jsonl", [{"prompt": q, "references": [a]} for q, a in rows])
        out.append(
            {
                "name": name,
                "dev": str(root / "dev" / f"{name}.jsonl"),
                "test": str(root / "test" / f"{name}.jsonl"),
                "metric": metric,
                "max_new_tokens": 4,
            }
        )
    return out


def adapter_target(backend, model, folder, split: dict):
    """A prepared target of two char-F1 benchmarks (reversal, copying) whose references are the
    completions of ``model`` as it is now (e.g. one random adapter loaded), so that other adapters
    score between 0 and 1."""
    from mergemix.data.prepared import load_prepared, prepare_dataset

    folder = Path(folder)
    benches = []
    for bench, pairs in (("rev", reversal(12, seed=11)), ("copy", copying(12, seed=12))):
        prompts = [q for q, _ in pairs]
        refs = backend.generate(model, [[{"role": "user", "content": q}] for q in prompts], 4)
        for part, sl in (("dev", slice(0, 6)), ("test", slice(6, 12))):
            write_jsonl(
                folder / part / f"{bench}.jsonl",
                [{"prompt": q, "references": [r or "x"]} for q, r in zip(prompts[sl], refs[sl])],
            )
        benches.append(
            {
                "name": bench,
                "dev": str(folder / "dev" / f"{bench}.jsonl"),
                "test": str(folder / "test" / f"{bench}.jsonl"),
                "metric": "char_f1",
                "max_new_tokens": 4,
            }
        )
    prepare_dataset("skill", {"source": "benchmarks", "benchmarks": benches}, split, folder / "data")
    return load_prepared(folder / "data")


# --- shared pytest fixtures of the language-model tests (import them into a test module) ---------
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def offline():
    """Every test of the module runs with the hubs offline (HF_HUB_OFFLINE and friends)."""
    from conftest import offline_env

    with offline_env():
        yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny Llama model folder (tokenizer and weights, saved with save_pretrained)."""
    return make_model_dir(tmp_path_factory.mktemp("tiny_llama") / "model")
