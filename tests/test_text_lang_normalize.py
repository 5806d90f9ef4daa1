"""Language id (zh / en / other) and text normalization."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from lmstack.text.lang import detect_language
from lmstack.text.normalize import dedup_key_text, fix_mojibake, html_to_text, normalize_text

FIX = Path(__file__).parent / "data_fixtures"


def _docs(name):
    return [d.strip() for d in (FIX / name).read_text(encoding="utf-8").split("=====\n") if d.strip()]


def test_detect_language_on_fixtures():
    for d in _docs("good_en.txt"):
        lang, score = detect_language(d)
        assert lang == "en" and 0.5 < score <= 1.0
    for d in _docs("good_zh.txt"):
        lang, score = detect_language(d)
        assert lang == "zh" and 0.5 < score <= 1.0


def test_detect_language_other():
    others = [
        "Der schnelle braune Fuchs springt über den faulen Hund, und das ist nicht gut für die Katze.",
        "Le chat est sur la table et il ne veut pas descendre pour manger avec nous ce soir.",
        "これは日本語の文章です。ひらがなとカタカナがたくさん入っています。",
        "한국어 문장은 이렇게 생겼습니다. 오늘 날씨가 좋네요.",
        "Это предложение написано на русском языке и не является английским.",
        "12345 67890 !!! ???",
        "",
    ]
    for t in others:
        assert detect_language(t)[0] == "other", t


def test_normalize_nfkc_control_whitespace():
    raw = "ＡＢＣ１２３\u3000full\x00width\u200b\t\tspaces  \r\n\r\n\r\n\r\nnext ﬁ line   "
    text, changed = normalize_text(raw)
    assert text == unicodedata.normalize("NFKC", "ABC123 fullwidth spaces\n\nnext ﬁ line")
    assert {"nfkc", "control", "whitespace"} <= set(changed)
    keep, changed2 = normalize_text(raw, nfkc=False)
    assert "ＡＢＣ" in keep and "nfkc" not in changed2


def test_mojibake_repaired_only_when_broken():
    good = "café, naïve, 中文, it’s"
    broken = good.encode("utf-8").decode("cp1252", errors="replace")
    assert broken != good
    assert fix_mojibake(broken) == good
    assert fix_mojibake(good) == good
    assert fix_mojibake("Ã is a letter in Portuguese: São Paulo") == "Ã is a letter in Portuguese: São Paulo"


def test_html_to_text():
    html = ("<html><head><title>T</title><style>p{color:red}</style></head><body><h1>Title</h1>"
            "<p>Fish &amp; chips</p><script>var x=1;</script><ul><li>one</li><li>two</li></ul></body></html>")
    text = html_to_text(html)
    assert "Fish & chips" in text and "Title" in text and "- one" in text
    assert "color" not in text and "var x" not in text
    out, changed = normalize_text(html)
    assert "html" in changed and "<p>" not in out
    same, changed = normalize_text("a < b and c > d", html_mode="auto")
    assert same == "a < b and c > d" and "html" not in changed


def test_dedup_key_ignores_case_punct_space():
    assert dedup_key_text("Hello,  World!") == dedup_key_text("hello world") == "hello world"
    assert dedup_key_text("ＨＥＬＬＯ") == "hello"


def test_nfkc_keeps_chinese_punctuation_by_default():
    raw = "你好，世界！（测试）：ＡＢＣ１２３"
    text, _ = normalize_text(raw)
    assert text == "你好，世界！（测试）：ABC123"
    folded, _ = normalize_text(raw, keep_cjk_punct=False)
    assert folded == unicodedata.normalize("NFKC", raw) == "你好,世界!(测试):ABC123"
