"""Quality signals against the published Gopher / C4 / FineWeb definitions on hand-computed inputs, and each
filter rule removing a planted document (English and Chinese) while the clean fixtures pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.text.quality import (QualityConfig, dup_ngram_char_frac, quality_check, quality_signals,
                                  top_ngram_char_frac, words_of)

FIX = Path(__file__).parent / "data_fixtures"
EN = [d.strip() for d in (FIX / "good_en.txt").read_text(encoding="utf-8").split("=====\n") if d.strip()]
ZH = [d.strip() for d in (FIX / "good_zh.txt").read_text(encoding="utf-8").split("=====\n") if d.strip()]


def test_gopher_ngram_fractions_hand_computed():
    w = "a b a b c".split()
    # most frequent 2-gram ("a","b") occurs twice, covering 2*2 chars of 5 word chars
    assert top_ngram_char_frac(w, 2) == pytest.approx(4 / 5)
    w = "x y z q x y z".split()
    # duplicated 3-gram (x y z) at 0 and 4 covers words 0,1,2,4,5,6 -> 6 of 7 chars
    assert dup_ngram_char_frac(w, 3) == pytest.approx(6 / 7)
    assert dup_ngram_char_frac("a b c d e".split(), 2) == 0.0
    words = ["alpha", "beta", "alpha", "beta", "gamma"]
    assert top_ngram_char_frac(words, 2) == pytest.approx(2 * 9 / 23)


def test_signals_hand_computed():
    text = "One two three...\n- four five\n- six seven\nOne two three...\n\n#tag #tag eight."
    s = quality_signals(text)
    assert s["n_words"] == 13  # one two three four five six seven one two three tag tag eight
    assert s["ellipsis_lines"] == pytest.approx(2 / 5)
    assert s["bullet_lines"] == pytest.approx(2 / 5)
    assert s["dup_line_frac"] == pytest.approx(1 / 5)
    assert s["symbol_word_ratio"] == pytest.approx(4 / s["n_words"])  # two '#' + two '...'
    assert s["line_punct_ratio"] == pytest.approx(3 / 5)  # lines ending ., ., .  (ellipsis ends with '.')


def test_cjk_words_are_characters():
    assert words_of("我们去GPT-4公园") == ["我", "们", "去", "GPT", "4", "公", "园"]
    s = quality_signals(ZH[0])
    assert s["cjk"] == 1.0 and s["n_words"] > 100


def test_fixtures_pass():
    for d in EN + ZH:
        assert quality_check(d, QualityConfig())[0] is None


EN_BAD = {
    "too_short": "The cat sat on the mat and that was the end of it.",
    "mean_word_length_high": " ".join(["internationalization characterization"] * 30 + ["the", "and", "of", "with"]) + ".",
    "mean_word_length_low": ("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3) + "the and of with to be.",
    "alpha_words_low": EN[0] + " " + " ".join(str(1000 + i) for i in range(60)),
    "symbol_word_ratio": EN[1] + " " + " ".join(f"#tag{i}" for i in range(20)),
    "bullet_lines": "\n".join(f"- item number {i} of the list with the words and that." for i in range(20)),
    "ellipsis_lines": "\n".join(f"{s}..." for s in EN[2].split(". ")),
    "stop_words": " ".join(["Quantum", "dynamics", "govern", "particles", "across", "measured", "systems."] * 10),
    "dup_lines": "\n".join([EN[3][:80] + "."] * 6 + [EN[4]]),
    "top_2gram": EN[5] + " " + " ".join(["apple pie"] * 40),
    "dup_5gram": EN[0] + " " + EN[0].split(". ")[0] + ". " + EN[0].split(". ")[1] + ".",
    "lorem_ipsum": EN[1] + " Lorem ipsum dolor sit amet.",
    "line_punct_ratio": "\n".join(w for w in EN[2].replace(".", "").replace(",", "").split(" ")[:60:3]
                                  ) + "\n" + " ".join(EN[2].replace(".", "").split(" ")),
}


@pytest.mark.parametrize("reason", sorted(EN_BAD))
def test_each_english_rule(reason):
    got, sig = quality_check(EN_BAD[reason], QualityConfig())
    if reason == "dup_5gram":
        assert got is not None and got.startswith(("dup_", "top_")), (got, sig)
    elif reason == "line_punct_ratio":
        assert got in ("line_punct_ratio", "short_lines"), (got, sig)
    else:
        assert got == reason, (got, sig)


def test_rules_can_be_switched_off():
    cfg = QualityConfig(min_words=None, min_stop_words=None, min_line_punct_ratio=None, min_mean_word_length=None)
    assert quality_check(EN_BAD["too_short"], cfg)[0] is None


ZH_BAD = {
    "too_short": "今天天气很好。",
    "stop_words": "春夏秋冬，东南西北，山川河流，日月星辰，风雨雷电，花草树木，鸟兽虫鱼，金木水火土。" * 2
                  + "江河湖海，天地玄黄，宇宙洪荒，日月盈昃，辰宿列张，寒来暑往，秋收冬藏。",
    "dup_lines": "\n".join([ZH[0][:40] + "。"] * 6 + [ZH[1]]),
    "top_2gram": ZH[2] + "哈哈" * 80,
    "bullet_lines": "\n".join(f"• 第{i}条：我们的产品质量很好，价格也很便宜，欢迎大家选购。" for i in range(12)),
}


@pytest.mark.parametrize("reason", sorted(ZH_BAD))
def test_each_chinese_rule(reason):
    got, sig = quality_check(ZH_BAD[reason], QualityConfig())
    if reason == "top_2gram":
        assert got is not None and got.startswith(("top_", "dup_")), (got, sig)
    elif reason == "bullet_lines":
        assert got in ("bullet_lines", "dup_5gram", "dup_6gram", "top_2gram", "top_3gram", "top_4gram"), (got, sig)
    else:
        assert got == reason, (got, sig)


def _naive_top(words, n):
    from collections import Counter

    if len(words) < n:
        return 0.0
    gram, count = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)[0]
    return 0.0 if count <= 1 else sum(map(len, gram)) * count / sum(map(len, words))


def _naive_dup(words, n):
    covered = [False] * len(words)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    for i, g in enumerate(grams):
        if grams.count(g) > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words)) if words else 0.0


def test_vectorized_ngram_stats_match_naive_definition():
    import random

    rng = random.Random(0)
    for _ in range(40):
        vocab = ["a", "bb", "ccc", "dddd", "eeeee"][: rng.randint(2, 5)]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 40))]
        for n in (2, 3, 4):
            assert top_ngram_char_frac(words, n) == pytest.approx(_naive_top(words, n))
        for n in (5, 7, 10):
            assert dup_ngram_char_frac(words, n) == pytest.approx(_naive_dup(words, n))
