"""The language study's metrics against values computed by hand, including Japanese text."""

import math

import pytest

from mergemix import text_metrics as tm


def test_exact_match_best_reference_and_whitespace():
    assert tm.exact_match(["はい", " no ", "x"], [["はい"], ["yes", "no"], ["y"]]) == pytest.approx(2 / 3)


def test_exact_match_figure_parses_numbers():
    preds = ["1,000", "１２", "3.50", "abc", "7"]
    refs = [["1000"], ["12"], ["3.5"], ["1"], ["8"]]
    assert tm.exact_match_figure(preds, refs) == pytest.approx(3 / 5)
    assert tm.parse_number("２，０００") == 2000.0 and tm.parse_number("二") is None


def test_char_f1_japanese():
    # 東京都 vs 東京: 2 common characters, precision 2/3, recall 1 -> F1 0.8
    assert tm.char_f1(["東京都"], [["東京"]]) == pytest.approx(0.8)
    # the best of several references counts; no overlap scores 0
    assert tm.char_f1(["大阪", "京都"], [["東京", "大阪"], ["名古屋"]]) == pytest.approx(0.5)
    assert tm.char_f1([" 東 京 "], [["東京"]]) == pytest.approx(1.0)  # whitespace is ignored


def test_set_f1_lines():
    # chABSA-style: one "entity sentiment" per line
    pred = "売上 positive\n利益 negative\n株価 neutral"
    ref = "売上 positive\n利益 negative"
    assert tm.set_f1([pred], [[ref]]) == pytest.approx(0.8)
    assert tm.set_f1(["a"], [["b"]]) == 0.0


def test_bleu_en_known_value():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert tm.bleu_en(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, abs=1e-4)
    assert tm.bleu_en(["a b c d e"], [["x y", "a b c d e"]]) == pytest.approx(1.0)  # several references


def test_bleu_ja_mecab_known_value():
    pytest.importorskip("MeCab", reason="ja-mecab needs mecab-python3 (the lm extra)")
    from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

    hyp, ref = "私は今日学校へ行きました", "私は昨日学校へ行きました"
    assert TokenizerJaMecab()(hyp).split() == ["私", "は", "今日", "学校", "へ", "行き", "まし", "た"]
    # word n-gram precisions 7/8, 5/7, 3/6, 2/5
    expected = (7 / 8 * 5 / 7 * 3 / 6 * 2 / 5) ** 0.25
    assert tm.bleu_ja([hyp], [[ref]]) == pytest.approx(expected, abs=1e-4)
    assert tm.score("bleu-ja", [ref], [[ref]]) == pytest.approx(1.0)


def test_bleu_ja_character_tokenizer_known_value():
    # one differing character out of 12: n-gram precisions 11/12, 9/11, 7/10, 6/9
    expected = (11 / 12 * 9 / 11 * 7 / 10 * 6 / 9) ** 0.25
    got = tm.score("bleu_ja_char", ["私は今日学校へ行きました"], [["私は昨日学校へ行きました"]])
    assert got == pytest.approx(expected, abs=1e-4)
    assert not math.isclose(got, 1.0)


def test_metric_errors_name_the_problem():
    with pytest.raises(KeyError, match="available"):
        tm.get_metric("rouge")
    with pytest.raises(ValueError, match="non-empty list"):
        tm.exact_match(["a"], ["a"])  # a bare string is not a list of references
    with pytest.raises(ValueError, match="2 predictions but 1"):
        tm.char_f1(["a", "b"], [["a"]])
