"""Back-translation (`lmstack data augment --method backtranslate`): the round-trip similarity filter (chrF against
sacrebleu's corpus chrF on the pair), exact dedup, the quality gate and their accounting, with a stub translator
whose outputs are chosen per case; then the real path with a tiny random decoder through the engine (the filters
and counts, not translation quality) and the CLI's one-line errors."""

from __future__ import annotations

import json

import pytest

from lmstack.cli import main as cli_main
from lmstack.data.backtranslate import BacktranslateConfig, backtranslate_records, chrf

ROWS = [
    {"text": "Where is my parcel? It was due on Monday.", "label": "shipping"},        # good paraphrase
    {"text": "I was charged twice for order 4417.", "label": "billing"},                # loses the number
    {"text": "Please reset my password.", "label": "account"},                         # identical round trip
    {"text": "Can I return a lamp after thirty days?", "label": "returns"},            # drifts away
    {"text": "The sofa arrived broken.", "label": "damage"},                            # translator gives nothing
    {"text": "我的包裹三天前就发出了，现在到哪里了？", "label": "shipping"},               # zh -> en -> zh paraphrase
]
BACK = {
    "Where is my parcel? It was due on Monday.": "Where is my package? It was due on Monday.",
    "I was charged twice for order 4417.": "I was charged twice for my order.",
    "Please reset my password.": "Please reset my password.",
    "Can I return a lamp after thirty days?": "Green ideas sleep furiously tonight.",
    "The sofa arrived broken.": "",
    "我的包裹三天前就发出了，现在到哪里了？": "我的包裹三天前就寄出了，现在到哪里了？",
}


def stub(texts, src, tgt):
    calls.append((src, tgt, list(texts)))
    if (src, tgt) in (("en", "zh"), ("zh", "en")) and not any(t.startswith("PIVOT:") for t in texts):
        return ["PIVOT:" + t for t in texts]
    return [BACK[t[len("PIVOT:"):]] for t in texts]


calls: list = []


def test_filters_and_accounting_with_a_stub_translator():
    import sacrebleu

    calls.clear()
    out, rep = backtranslate_records(ROWS, stub, BacktranslateConfig(min_similarity=0.4))
    assert [c[:2] for c in calls] == [("en", "zh"), ("zh", "en"), ("zh", "en"), ("en", "zh")]  # batched per pair
    assert rep["candidates"] == 6 and rep["kept"] == 2
    assert rep["rejected"] == {"dedup:exact": 1, "quality:protected_token_lost": 1, "roundtrip:low_similarity": 1,
                               "translate:empty": 1}
    assert rep["kept"] + sum(rep["rejected"].values()) == rep["candidates"]
    assert [o["text"] for o in out] == [BACK[ROWS[0]["text"]], BACK[ROWS[5]["text"]]]
    assert out[0]["label"] == "shipping" and out[0]["augment_op"] == "backtranslate:en-zh-en"
    assert out[1]["augment_op"] == "backtranslate:zh-en-zh" and out[1]["pivot_text"] == "PIVOT:" + ROWS[5]["text"]
    for o in out:  # the similarity is sacrebleu's chrF of the pair
        ref = sacrebleu.corpus_chrf([o["text"]], [[ROWS[o["augmented_from"]]["text"]]]).score / 100
        assert o["roundtrip_similarity"] == pytest.approx(ref, abs=1e-4)
    assert chrf("Green ideas sleep furiously tonight.", ROWS[3]["text"]) < 0.4
    # a stricter threshold rejects the paraphrases too; 0 keeps the drifted one
    _, strict = backtranslate_records(ROWS, stub, BacktranslateConfig(min_similarity=0.99))
    assert strict["kept"] == 0 and strict["rejected"]["roundtrip:low_similarity"] == 4  # all but the identical one
    _, loose = backtranslate_records(ROWS, stub, BacktranslateConfig(min_similarity=0.0))
    # the drifted text passes the similarity filter at 0 but not the quality gate
    assert loose["kept"] == 2 and "roundtrip:low_similarity" not in loose["rejected"]
    assert sum(v for k, v in loose["rejected"].items() if k.startswith("quality:")) == 2


def test_a_translator_that_repeats_its_instruction_translated_nothing():
    """Gemma 3 270M (the base model) answered "Translate the following ... text into English. Reply with the
    translation only. ..." for some texts; one such round trip scored chrF 0.40 against its original. An echo in
    the pivot or the round trip is rejected whatever its similarity (unless the original itself says it)."""
    row = {"text": "Translate the following text into English: my credit card was charged the wrong amount"}
    echo = "Translate the following Simplified Chinese text into English. Reply with the translation only. " + \
        "My credit card was charged the wrong amount"

    def echoing(texts, src, tgt):
        return [echo for _ in texts]

    ok = {"text": "My credit card was charged the wrong amount", "label": "billing"}
    out, rep = backtranslate_records([ok], echoing, BacktranslateConfig(min_similarity=0.0))
    assert out == [] and rep["rejected"] == {"translate:prompt_echo": 1}
    out, rep = backtranslate_records([row], echoing, BacktranslateConfig(min_similarity=0.0, quality=False))
    assert "translate:prompt_echo" not in rep["rejected"]  # the original asks for a translation itself


def test_tiny_model_end_to_end_and_cli(tmp_path, capsys):
    from lmstack.serve.translate import llm_translator
    from tests.serve_fixtures import shared_model_dir

    model = shared_model_dir()
    translate = llm_translator(model, max_tokens=12)
    for thr in (0.0, 0.5):
        out, rep = backtranslate_records(ROWS, translate, BacktranslateConfig(min_similarity=thr))
        assert rep["candidates"] == len(ROWS)
        assert rep["kept"] + sum(rep["rejected"].values()) == rep["candidates"]
        assert all(o["roundtrip_similarity"] >= thr for o in out)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    rc = cli_main(["data", "augment", str(src), "--out", str(tmp_path / "out.jsonl"), "--method", "backtranslate",
                   "--model", str(model), "--min-similarity", "0.0"])
    assert rc in (0, None)
    rep = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == len(ROWS) + rep["kept"]
    capsys.readouterr()
    for bad in (["--method", "backtranslate"], ["--method", "telepathy"],
                ["--method", "backtranslate", "--model", str(model), "--min-similarity", "2"]):
        assert cli_main(["data", "augment", str(src), "--out", str(tmp_path / "x.jsonl"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
