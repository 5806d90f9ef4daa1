"""lmstack data augment: each EDA operation checked by what it may change (synonyms only from the list, swaps keep
the multiset, deletions are a subsequence, insertions a supersequence), protected spans (numbers, PII
placeholders, names) survive every operation, Chinese goes through jieba, the filter report adds up, and the
CLI verb writes records / fails in one line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from lmstack.data.augment import (
    SYNONYM_DIR, AugmentConfig, Augmenter, augment_records, read_synonyms, tokenize,
)
from lmstack.text.normalize import dedup_key_text

EN = ["I was billed twice for the same subscription", "How long does shipping to Canada take?",
      "My order 12345 was charged the wrong amount, email <EMAIL> please",
      "The app crashes when I open it after the update", "Please cancel and refund my subscription today"]
ZH = ["我的订阅被重复扣费了", "保存的时候报错500，请联系<PHONE>", "可以修改收货地址吗？", "退款什么时候能到账？"]


def _vocab(lang: str) -> set[str]:
    words = {w for k in read_synonyms(SYNONYM_DIR / f"{lang}.txt") for w in k}
    return words if lang == "en" else {c for w in words for c in w}


def _units(text: str, lang: str) -> list[str]:
    """English: words; Chinese: characters (re-segmenting an edited sentence may cut it differently)."""
    return [t.lower() for t in tokenize(text, "en")] if lang == "en" else [c for c in text if not c.isspace()]


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@pytest.mark.parametrize("text", EN + ZH)
def test_each_operation_changes_only_what_it_may(text):
    lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"
    vocab = _vocab(lang)
    src = _units(text, lang)
    aug = Augmenter(AugmentConfig(alpha=0.3))
    for seed in range(8):
        rng = random.Random(seed)
        syn = _units(aug.one(text, "synonym", rng), lang)
        assert all(t in vocab for t in Counter(syn) - Counter(src)), (text, syn)
        assert Counter(_units(aug.one(text, "swap", rng), lang)) == Counter(src)
        de = _units(aug.one(text, "delete", rng), lang)
        assert _is_subsequence(de, src) and de
        ins = _units(aug.one(text, "insert", rng), lang)
        assert _is_subsequence(src, ins)
        assert all(t in vocab for t in Counter(ins) - Counter(src))


def test_protected_spans_survive_every_operation():
    text = "Maria paid 49.99 for order 12345 and wrote from <EMAIL> to Hong Kong support"
    aug = Augmenter(AugmentConfig(alpha=0.5, n_aug=8, protect=("support",)))
    for seed in range(10):
        for op, cand in aug.augment(text, random.Random(seed)):
            for keep in ("Maria", "49.99", "12345", "<EMAIL>", "Hong", "Kong", "support"):
                assert keep in cand, (op, cand)
    zh = "订单12345的退款请发到<EMAIL_1>"
    for seed in range(10):
        for op, cand in aug.augment(zh, random.Random(seed)):
            assert "12345" in cand and "<EMAIL_1>" in cand, (op, cand)


def test_chinese_is_segmented_into_words_by_jieba():
    jieba = pytest.importorskip("jieba")
    text = "我的订阅被重复扣费了"
    assert tokenize(text, "zh") == [t for t in jieba.lcut(text) if t.strip()]
    outs = {Augmenter().one(text, "synonym", random.Random(s)) for s in range(10)}
    assert any(o != text for o in outs) and all("\ufffd" not in o for o in outs)


def test_filter_report_adds_up_and_kept_copies_are_new():
    rows = [{"text": t, "label": f"l{i % 2}"} for i, t in enumerate(EN + ZH)]
    out, rep = augment_records(rows, AugmentConfig(n_aug=6, seed=1))
    assert rep["candidates"] == len(rows) * 6
    assert rep["kept"] + sum(rep["rejected"].values()) == rep["candidates"] == rep["kept"] + sum(
        v for k, v in rep["rejected"].items())
    assert rep["rejected"].get("dedup:exact", 0) > 0  # deleting 0 words of a short text repeats it: caught
    keys = [dedup_key_text(r["text"]) for r in out]
    assert len(keys) == len(set(keys)) and not set(keys) & {dedup_key_text(r["text"]) for r in rows}
    assert all(r["label"] == rows[r["augmented_from"]]["label"] for r in out)
    # with both filters off every candidate is kept
    out2, rep2 = augment_records(rows, AugmentConfig(n_aug=6, seed=1, dedup=False, quality=False))
    assert rep2["kept"] == rep2["candidates"] and not rep2["rejected"]


def test_cli_augment_writes_records_and_fails_in_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "label": "x"}, ensure_ascii=False) + "\n" for t in EN + ZH))
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "data", "augment", str(src), "--out", str(out),
                        "--n-aug", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(EN + ZH) + rep["kept"] and lines[0]["text"] == EN[0]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "data", "augment", str(tmp_path / "bad.jsonl"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("lmstack: ") and len(r.stderr.strip().splitlines()) == 1
    from lmstack.errors import ConfigError
    with pytest.raises(ConfigError, match="choose from"):
        AugmentConfig(ops=("synonym", "shout"))
