"""caption_metrics: values worked out by hand from the metric definitions, edge cases, and the no-Java tokenizer against the
official PTB tokenizer."""

from __future__ import annotations

import math
import os

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from vlcap import caption_metrics
from vlcap.caption_metrics import (
    METRICS,
    jieba_tokenize,
    mean_words,
    ptb_tokenize,
    score_captions,
    simple_tokenize,
    tokenizer_for,
    tokenizer_used,
)

needs_java = pytest.mark.skipif(not caption_metrics.java_available(), reason="the official PTB tokenizer needs Java")
BOTH = ["simple", pytest.param("ptb", marks=needs_java)]

# Real COCO val2014 captions (from cocoapi's captions_val2014_fakecap_results.json), plus the punctuation users write.
TYPICAL = [
    "A man with a red helmet on a small moped on a dirt road. ",
    "A kitchen with cabinets, a stove, microwave and refrigerator.",
    "An orange striped tabby cat laying on top of a red vehicle's wheel.",
    "A hungry giraffe is eating it's food in the zoo.",
    "A yellow airplane wing pointed toward the ground?",
    "a small air plane getting ready to take off .",
    "A man's dog isn't running; it's \"fast\" (really).",
    "A sign that says 'STOP' on the corner, at 5:30 p.m.",
    "A 2-year-old kid with a T-shirt, near the St. Louis arch.",
    "A woman\u2019s hand holding a cell phone (an iPhone)...",
    "The dogs' owner can't find a 50% off sale sign for $5.",
]


@pytest.mark.parametrize("tokenizer", BOTH)
def test_caption_equal_to_its_references_scores_one(tokenizer):
    captions = {"1": "A man riding a wave on top of a surfboard.", "2": "Two giraffes standing next to a tall tree."}
    references = {"1": [captions["1"]] * 3, "2": [captions["2"]], "3": ["A plate of food with broccoli and rice."]}
    scores = score_captions(captions, references, tokenizer)
    assert list(scores) == list(METRICS) and all(isinstance(v, float) for v in scores.values())
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name
    assert scores["CIDEr"] > 1.0


@pytest.mark.parametrize("tokenizer", BOTH)
def test_caption_sharing_no_word_with_its_references_scores_zero(tokenizer):
    # Each caption matches the *other* image's reference: scoring must pair captions with their own image's references.
    captions = {"zebra": "two zebras grazing in tall grass", "bus": "a red bus parked on the street"}
    references = {"zebra": ["a red bus parked on the street"], "bus": ["two zebras grazing in tall grass"]}
    scores = score_captions(captions, references, tokenizer)
    assert scores == pytest.approx(dict.fromkeys(METRICS, 0.0), abs=1e-9)


def test_cider_d_by_hand():
    # CIDEr-D (pycocoevalcap): each n-gram g of a sentence gets weight tf(g) * (log N - log max(1, df(g))), with N the number
    # of images (2) and df(g) the number of images whose references contain g. So with w = log 2: weight 0 for "a" and "sat"
    # (in both images' references), w for every other n-gram, seen in the references or not.
    # Per reference and n: sum_g min(cand_g, ref_g) * ref_g / (|cand| |ref|), times exp(-(len_c - len_r)^2 / (2 * 6^2));
    # image score = 10 * mean over n = 1..4, averaged over references; CIDEr = mean over images.
    captions = {"cat": "a cat cat ran", "dog": "a dog sat"}
    references = {"cat": ["a cat sat"], "dog": ["a dog sat", "the dog sat"]}
    # "cat": unigrams cand {a:0, cat:2w (clipped to w), ran:w}, |cand| = w*sqrt(5); ref {a:0, cat:w, sat:0}, |ref| = w
    #   -> w*w / (w*sqrt(5) * w) = 1/sqrt(5).  Bigrams cand {a cat, cat cat, cat ran} all w, ref {a cat, cat sat} all w
    #   -> w*w / (w*sqrt(3) * w*sqrt(2)) = 1/sqrt(6).  No shared tri- or 4-grams.  Lengths 4 vs 3: penalty exp(-1/72).
    cat = 10 * math.exp(-1 / 72) * (1 / math.sqrt(5) + 1 / math.sqrt(6) + 0 + 0) / 4
    # "dog" vs "a dog sat": identical, so n = 1, 2, 3 give 1 and n = 4 has no 4-grams (0): 3/4.
    # "dog" vs "the dog sat": unigrams {a:0, dog:w, sat:0} vs {the:w, dog:w, sat:0} -> 1/sqrt(2); bigrams {a dog, dog sat}
    #   vs {the dog, dog sat} -> 1/2; no shared trigram.  Same length, no penalty.
    dog = 10 * ((1 + 1 + 1 + 0) / 4 + (1 / math.sqrt(2) + 1 / 2 + 0 + 0) / 4) / 2
    assert score_captions(captions, references, "simple")["CIDEr"] == pytest.approx((cat + dog) / 2, abs=1e-6)
    # Per picture: each image gets its own value, and the corpus CIDEr is their mean.
    scores, each = score_captions(captions, references, "simple", per_image=True)
    assert each == pytest.approx({"cat": cat, "dog": dog}, abs=1e-6) and list(each) == list(captions)
    assert scores == score_captions(captions, references, "simple")


@pytest.mark.parametrize("tokenizer", BOTH)
def test_per_picture_cider_averages_to_the_corpus_cider(tokenizer):
    captions = {str(i): c for i, c in enumerate(TYPICAL)}
    references = {str(i): [TYPICAL[(i + k) % len(TYPICAL)] for k in (0, 1, 2)] for i in range(len(TYPICAL))}
    references["3"] = ["a giraffe eating leaves from a tree in a zoo"]  # one picture whose caption matches less well
    scores, each = score_captions(captions, references, tokenizer, per_image=True)
    assert set(each) == set(captions) and all(isinstance(v, float) for v in each.values())
    assert sum(each.values()) / len(each) == pytest.approx(scores["CIDEr"], abs=1e-9)
    assert min(each, key=each.get) == "3"


def test_bleu_and_rouge_by_hand():
    scores = score_captions({"1": "the cat sat on mat"}, {"1": ["the cat sat on the mat"]}, "simple")
    # Clipped n-gram precisions 5/5, 3/4 ("on mat" is not in the reference), 2/3, 1/2; brevity penalty exp(1 - 6/5).
    penalty = math.exp(1 - 6 / 5)
    for n, precisions in enumerate([[1], [1, 3 / 4], [1, 3 / 4, 2 / 3], [1, 3 / 4, 2 / 3, 1 / 2]], start=1):
        assert scores[f"BLEU-{n}"] == pytest.approx(penalty * math.prod(precisions) ** (1 / n), abs=1e-6)
    # ROUGE-L: longest common subsequence 5 words; precision 5/5, recall 5/6, F with beta = 1.2.
    p, r, beta2 = 1.0, 5 / 6, 1.2**2
    assert scores["ROUGE-L"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p), abs=1e-6)


@needs_java
def test_fallback_tokenizer_matches_official_one():
    assert [simple_tokenize(c) for c in TYPICAL] == ptb_tokenize(TYPICAL)


@needs_java
@pytest.mark.skipif(not os.access(caption_metrics.PTB_JAR.parent, os.W_OK), reason="PTBTokenizer writes beside its jar")
def test_ptb_tokenize_matches_pycocoevalcap():
    official = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(TYPICAL)})
    assert ptb_tokenize(TYPICAL) == [official[i][0] for i in range(len(TYPICAL))]


@needs_java
def test_both_tokenizers_score_plain_captions_alike():
    captions = {"1": "a man riding a wave on a surfboard", "2": "two giraffes next to a tree", "3": "a plate of food"}
    references = {
        "1": ["a surfer riding a big wave", "a man on a surfboard in the ocean"],
        "2": ["two giraffes standing by a tall tree"],
        "3": ["a plate of rice and broccoli", "food on a plate"],
    }
    assert score_captions(captions, references, "simple") == score_captions(captions, references, "ptb")


@pytest.mark.parametrize("tokenizer", BOTH)
def test_scoring_prints_nothing(tokenizer, capfd):
    score_captions({"1": "a dog on a couch"}, {"1": ["A dog lies on the couch."]}, tokenizer)
    assert capfd.readouterr() == ("", "")


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="No captions"):
        score_captions({}, {"1": ["a dog"]})
    with pytest.raises(ValueError, match="no reference captions"):
        score_captions({"1": "a dog", "2": "a cat"}, {"1": ["a dog"]})
    with pytest.raises(ValueError, match="no reference captions"):
        score_captions({"1": "a dog"}, {"1": []})
    with pytest.raises(ValueError, match="list of reference captions"):
        score_captions({"1": "a dog"}, {"1": "a dog on a couch"})
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        score_captions({"1": "a dog"}, {"1": ["a dog"]}, tokenizer="nltk")


def test_no_java_means_simple_tokenizer(monkeypatch):
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)
    assert tokenizer_used() == "simple"
    with pytest.raises(RuntimeError, match="needs Java"):
        tokenizer_used("ptb")


def test_mean_words():
    assert mean_words({"1": "a dog on a couch", "2": "two cats"}) == 3.5
    assert mean_words({}) == 0.0


# ---------------------------------------------------------------------------------------------------------------- Chinese


def test_chinese_is_cut_into_jieba_words_and_mixed_text_into_both():
    assert jieba_tokenize("白色背景上有一个红色的圆形。") == "白色 背景 上 有 一个 红色 的 圆形"
    assert jieba_tokenize("一只dog坐在“sofa”上，很好！") == "一只 dog 坐在 sofa 上 很 好"
    assert jieba_tokenize("Ａ dog's bone（骨头）") == "a dog 's bone -lrb- 骨头 -rrb-"  # fullwidth forms folded
    assert [jieba_tokenize(c) for c in TYPICAL] == [simple_tokenize(c) for c in TYPICAL], "English as before"


def test_auto_picks_jieba_when_any_text_is_chinese():
    english = {"1": "a dog on a couch"}
    assert tokenizer_for(english, {"1": ["a dog"]}) in ("ptb", "simple")
    assert tokenizer_for(english, {"1": ["一只狗"]}) == "jieba"
    assert tokenizer_for({"1": "沙发上的狗"}, {"1": ["a dog"]}) == "jieba"
    assert tokenizer_used("simple", ["一只狗"]) == "simple", "a named tokenizer is used as named"


def test_chinese_bleu_and_rouge_by_hand():
    # jieba words (asserted above): 白色 背景 上 有 一个 红色 的 圆形 against ... 红色 的 正方形. Clipped n-gram
    # precisions 7/8, 6/7, 5/6, 4/5; equal lengths, so no brevity penalty: BLEU-4 = (4/8)^(1/4).
    scores = score_captions({"1": "白色背景上有一个红色的圆形"}, {"1": ["白色背景上有一个红色的正方形"]})
    for n, precisions in enumerate([[7 / 8], [7 / 8, 6 / 7], [7 / 8, 6 / 7, 5 / 6], [7 / 8, 6 / 7, 5 / 6, 4 / 5]], 1):
        assert scores[f"BLEU-{n}"] == pytest.approx(math.prod(precisions) ** (1 / n), abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(7 / 8, abs=1e-6)  # LCS 7 of 8 words both ways: F = 7/8 for any beta


def test_chinese_cider_d_by_hand():
    # The words of test_cider_d_by_hand, in Chinese (a = 一只, cat = 猫, ran = 跑, sat = 睡觉, dog = 狗, the = 这条), so
    # the same working gives the value: "cat" 10 e^(-1/72) (1/sqrt(5) + 1/sqrt(6)) / 4; "dog" the mean over its two
    # references of 3/4 and (1/sqrt(2) + 1/2) / 4, times 10.
    captions = {"cat": "一只猫，猫跑", "dog": "一只狗睡觉"}
    references = {"cat": ["一只猫睡觉"], "dog": ["一只狗睡觉", "这条狗睡觉"]}
    words = [jieba_tokenize(t) for t in [*captions.values(), *references["cat"], *references["dog"]]]
    assert words == ["一只 猫 猫 跑", "一只 狗 睡觉", "一只 猫 睡觉", "一只 狗 睡觉", "这条 狗 睡觉"]
    cat = 10 * math.exp(-1 / 72) * (1 / math.sqrt(5) + 1 / math.sqrt(6)) / 4
    dog = 10 * ((1 + 1 + 1 + 0) / 4 + (1 / math.sqrt(2) + 1 / 2 + 0 + 0) / 4) / 2
    scores, each = score_captions(captions, references, per_image=True)
    assert each == pytest.approx({"cat": cat, "dog": dog}, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx((cat + dog) / 2, abs=1e-6)


def test_chinese_scoring_prints_nothing_and_counts_words(capfd):
    score_captions({"1": "沙发上的一只狗"}, {"1": ["一只狗躺在沙发上。"]})
    assert capfd.readouterr() == ("", "")
    assert mean_words(["一只狗躺在沙发上", "a dog on a couch"]) == (6 + 5) / 2
