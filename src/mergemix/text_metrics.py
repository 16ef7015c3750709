"""Text metrics of the paper's language study (Table 4), as pure functions.

Every metric takes the model outputs ``preds`` (one string per example) and the references
``refs`` (one list of acceptable strings per example) and returns a score in [0, 1] for the whole
benchmark. Per-example metrics take the best reference and average over examples; BLEU is a
corpus score (divided by 100).

Definitions follow llm-jp-eval where it is well defined, with these choices stated:

* ``exact_match``: the stripped prediction equals a stripped reference.
* ``exact_match_figure``: both parse as numbers (commas and full-width digits allowed) and are
  equal; an unparsable prediction scores 0.
* ``char_f1``: F1 of the character multisets of prediction and reference (whitespace removed), as
  in JSQuAD's character-level F1. llm-jp-eval's ``char_f1`` uses fuzzywuzzy's
  ``token_sort_ratio`` instead, which is close but not identical.
* ``set_f1``: prediction and reference are sets of lines; F1 of the two sets (chABSA).
* ``bleu_en``: sacrebleu corpus BLEU with its standard ``13a`` tokenizer.
* ``bleu_ja``: sacrebleu corpus BLEU with ``ja-mecab`` (MeCab with IPADIC, through the
  ``mecab-python3`` and ``ipadic`` packages of the ``lm`` extra); ``tokenize="char"`` is a
  dependency-free alternative (character n-grams), not comparable with published numbers.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Callable, Sequence

Refs = Sequence[Sequence[str]]


def _check(preds: Sequence[str], refs: Refs) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
    for i, r in enumerate(refs):
        if isinstance(r, str) or len(r) == 0:
            raise ValueError(f"references of example {i} must be a non-empty list of strings, got {r!r}")


def _mean_best(preds: Sequence[str], refs: Refs, score: Callable[[str, str], float]) -> float:
    _check(preds, refs)
    if not preds:
        return 0.0
    return float(sum(max(score(p, r) for r in rs) for p, rs in zip(preds, refs)) / len(preds))


def exact_match(preds: Sequence[str], refs: Refs) -> float:
    return _mean_best(preds, refs, lambda p, r: float(p.strip() == r.strip()))


def parse_number(text: str) -> float | None:
    """A number written in ``text`` (NFKC-normalised, commas removed), or None."""
    t = unicodedata.normalize("NFKC", text).strip().replace(",", "")
    try:
        return float(t)
    except ValueError:
        return None


def exact_match_figure(preds: Sequence[str], refs: Refs) -> float:
    def score(p: str, r: str) -> float:
        a, b = parse_number(p), parse_number(r)
        return float(a is not None and b is not None and a == b)

    return _mean_best(preds, refs, score)


def char_f1_pair(pred: str, ref: str) -> float:
    p = Counter(c for c in pred if not c.isspace())
    r = Counter(c for c in ref if not c.isspace())
    if not p and not r:
        return 1.0
    common = sum((p & r).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def char_f1(preds: Sequence[str], refs: Refs) -> float:
    return _mean_best(preds, refs, char_f1_pair)


def set_f1_pair(pred: str, ref: str) -> float:
    p = {s.strip() for s in pred.split("\n") if s.strip()}
    r = {s.strip() for s in ref.split("\n") if s.strip()}
    if not p and not r:
        return 1.0
    common = len(p & r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def set_f1(preds: Sequence[str], refs: Refs) -> float:
    return _mean_best(preds, refs, set_f1_pair)


def bleu(preds: Sequence[str], refs: Refs, tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU / 100. Examples may have different numbers of references."""
    _check(preds, refs)
    if not preds:
        return 0.0
    import sacrebleu

    k = max(len(r) for r in refs)
    # sacrebleu wants k reference streams of equal length; repeating a reference changes nothing
    # (n-gram counts are clipped by the max over references, and the closest length is the same)
    streams = [[rs[min(j, len(rs) - 1)] for rs in refs] for j in range(k)]
    try:
        result = sacrebleu.corpus_bleu(list(preds), streams, tokenize=tokenize)
    except RuntimeError as e:
        if tokenize.startswith("ja-"):
            raise RuntimeError(
                f"BLEU with tokenize={tokenize!r} needs MeCab: pip install 'mergemix[lm]' "
                "(or mecab-python3 ipadic); or set the benchmark's tokenizer to 'char'"
            ) from e
        raise
    return float(result.score) / 100.0


def bleu_en(preds: Sequence[str], refs: Refs) -> float:
    return bleu(preds, refs, "13a")


def bleu_ja(preds: Sequence[str], refs: Refs, tokenize: str = "ja-mecab") -> float:
    return bleu(preds, refs, tokenize)


METRICS: dict[str, Callable[[Sequence[str], Refs], float]] = {
    "exact_match": exact_match,
    "exact_match_figure": exact_match_figure,
    "char_f1": char_f1,
    "set_f1": set_f1,
    "bleu_en": bleu_en,
    "bleu_ja": bleu_ja,
    "bleu_ja_char": lambda p, r: bleu(p, r, "char"),
}


def get_metric(name: str) -> Callable[[Sequence[str], Refs], float]:
    key = name.replace("-", "_")
    if key not in METRICS:
        raise KeyError(f"unknown text metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[key]


def score(name: str, preds: Sequence[str], refs: Refs) -> float:
    return get_metric(name)(preds, refs)
