"""End-to-end pipeline on EN+ZH fixtures: each step removes/changes what it should and reports it with
examples; provenance fields; PII redacted; blocklists; mixing budgets; token shards; config and input errors
stop before any work; the CLI verbs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmstack.cli import main as cli_main
from lmstack.data.pipeline import run_pipeline
from lmstack.errors import ConfigError, DataError

FIX = Path(__file__).parent / "data_fixtures"
EN = [d.strip() for d in (FIX / "good_en.txt").read_text(encoding="utf-8").split("=====\n") if d.strip()]
ZH = [d.strip() for d in (FIX / "good_zh.txt").read_text(encoding="utf-8").split("=====\n") if d.strip()]
DE = ("Die Geschichte der Stadt ist lang und reich an Ereignissen. Im Mittelalter war sie ein wichtiger Ort für "
      "den Handel, und viele Kaufleute kamen aus fernen Ländern. Heute ist die Altstadt ein beliebtes Ziel für "
      "Touristen, die die alten Kirchen und die engen Gassen besuchen. Es gibt auch ein Museum, das die Geschichte "
      "der Region zeigt, und im Sommer finden viele Feste auf dem Marktplatz statt, zu denen Menschen aus der ganzen "
      "Umgebung kommen.")


@pytest.fixture()
def corpus(tmp_path):
    web = [EN[0], EN[1] + " Contact me at jane.roe@example.com or +1 (415) 555-2671.", EN[2], DE,
           "Too short to keep.", EN[3] + " This casino offers free spins.", EN[0].upper()]
    zh = [ZH[0], ZH[1] + "我的手机号是13812345678，身份证号11010519491231002X。", ZH[2] + "这里有赌博网站。", ZH[3]]
    with gzip.open(tmp_path / "web.jsonl.gz", "wt", encoding="utf-8") as f:
        for k, t in enumerate(web):
            f.write(json.dumps({"content": t, "url": f"https://e.com/{k}"}, ensure_ascii=False) + "\n")
        f.write("{broken\n")
    (tmp_path / "zh").mkdir()
    for k, t in enumerate(zh):
        (tmp_path / "zh" / f"{k}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "page.html").write_text(f"<html><body><script>x()</script><p>{EN[4]}</p><p>{EN[5]}</p></body></html>",
                                        encoding="utf-8")
    (tmp_path / "block.txt").write_text("# words\ncasino\n赌博\n", encoding="utf-8")
    return tmp_path


def _cfg(root: Path, **kw):
    cfg = {"inputs": [{"path": str(root / "web.jsonl.gz"), "name": "web", "text_field": "content",
                       "keep_fields": ["url"]},
                      {"path": str(root / "zh"), "name": "zh"},
                      {"path": str(root / "page.html"), "name": "html"}],
           "workers": 2, "blocklist": {"enabled": True, "files": [str(root / "block.txt")]}}
    cfg.update(kw)
    return cfg


def _out(path: Path):
    return [json.loads(x) for x in open(path / "data.jsonl", encoding="utf-8")]


def test_end_to_end(corpus):
    out = corpus / "out"
    rep = run_pipeline(_cfg(corpus), out)
    docs = _out(out)
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["read"]["removed"] == {"malformed_json": 1}
    assert steps["language"]["removed"] == {"lang_other": 1}
    assert steps["quality"]["removed"] == {"too_short": 1}
    assert steps["blocklist"]["removed"] == {"blocklisted": 2}
    assert steps["pii"]["changed"] == {"EMAIL": 1, "PHONE": 2, "CN_ID": 1}
    assert steps["exact_dedup"]["removed"] == {"exact_duplicate": 1}  # EN[0].upper()
    assert steps["normalize"]["changed"]["html"] == 1
    for name in ("language", "quality", "blocklist"):
        for reason, exs in steps[name]["examples"].items():
            assert exs and all(":" in e for e in exs)
    assert any("casino" in e for e in steps["blocklist"]["examples"]["blocklisted"])
    # output: order, provenance, redaction
    ids = [d["id"] for d in docs]
    assert ids == ["web/web.jsonl.gz:1", "web/web.jsonl.gz:2", "web/web.jsonl.gz:3", "zh/0.txt:0", "zh/1.txt:0",
                   "zh/3.txt:0", "html/page.html:0"]
    d1 = docs[1]
    assert d1["source"] == "web" and d1["meta"] == {"url": "https://e.com/1"} and d1["lang"] == "en"
    assert d1["path"].endswith("web.jsonl.gz") and d1["line"] == 2
    assert "<EMAIL>" in d1["text"] and "<PHONE>" in d1["text"] and "jane.roe" not in d1["text"]
    assert "<PHONE>" in docs[4]["text"] and "<CN_ID>" in docs[4]["text"] and docs[4]["lang"] == "zh"
    assert docs[-1]["text"].startswith(EN[4][:30]) and "x()" not in docs[-1]["text"]
    assert rep["totals"] == {"docs_in": 12, "docs_out": 7, "chars_in": rep["totals"]["chars_in"],
                             "chars_out": sum(len(d["text"]) for d in docs)}
    # report files
    j = json.loads((out / "report.json").read_text())
    assert j["documents"] == 7 and sum(j["histograms"]["output"]) == 7 and sum(j["histograms"]["input"]) == 12
    html = (out / "report.html").read_text()
    assert "too_short" in html and "lang_other" in html and "<svg" in html and html.count("<rect") > 4
    assert (out / "config.yaml").is_file() and not (out / "_staging").exists()


def test_worker_count_does_not_change_output(corpus):
    run_pipeline(_cfg(corpus, workers=1), corpus / "o1")
    run_pipeline(_cfg(corpus, workers=2, batch_size=2), corpus / "o2")
    assert (corpus / "o1" / "data.jsonl").read_bytes() == (corpus / "o2" / "data.jsonl").read_bytes()


def test_pii_drop_and_language_keep(corpus):
    rep = run_pipeline(_cfg(corpus, pii={"action": "drop"}, language={"keep": ["zh"]}), corpus / "o")
    docs = _out(corpus / "o")
    assert {d["lang"] for d in docs} == {"zh"} and len(docs) == 2
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["pii"]["removed"] == {"pii": 1} and steps["language"]["removed"]["lang_en"] == 7


def _synthetic(root: Path, n_a: int, n_b: int) -> list[dict]:
    for name, n in (("a", n_a), ("b", n_b)):
        with open(root / f"{name}.jsonl", "w") as f:
            for k in range(n):
                f.write(json.dumps({"text": f"{name} document number {k} " + "x" * (10 * (k + 1))}) + "\n")
    return [{"path": str(root / "a.jsonl"), "name": "a", "weight": 1.0},
            {"path": str(root / "b.jsonl"), "name": "b", "weight": 1.0}]


def _plain(inputs, **kw):
    return {"inputs": inputs, "workers": 1, "normalize": {"enabled": False}, "language": {"enabled": False},
            "quality": {"enabled": False}, "pii": {"enabled": False}, "dedup": {"near": False}, **kw}


def test_mixing_document_budget(tmp_path):
    inputs = _synthetic(tmp_path, 4, 8)
    # equal weights, budget 16: a (4 docs) is repeated twice, b (8 docs) kept once each
    rep = run_pipeline(_plain(inputs, mix={"enabled": True, "budget_documents": 16}), tmp_path / "o")
    src = [d["source"] for d in _out(tmp_path / "o")]
    assert src.count("a") == 8 and src.count("b") == 8 and rep["mix_rates"] == {"a": 2.0, "b": 1.0}
    # weights 3:1, budget 8 -> a keeps 6 of ... rate 1.5 (upsample), b rate 0.25 (subsample, seeded)
    inputs[0]["weight"] = 3.0
    cfg = _plain(inputs, mix={"enabled": True, "budget_documents": 8, "seed": 1})
    rep = run_pipeline(cfg, tmp_path / "o2")
    assert rep["mix_rates"] == {"a": 1.5, "b": 0.25}
    first = (tmp_path / "o2" / "data.jsonl").read_bytes()
    run_pipeline(cfg, tmp_path / "o3")
    assert (tmp_path / "o3" / "data.jsonl").read_bytes() == first
    src = [d["source"] for d in _out(tmp_path / "o2")]
    assert 4 <= src.count("a") <= 8 and 0 <= src.count("b") <= 8 and rep["documents"] == len(src)


def test_mixing_token_budget_no_upsample(tmp_path):
    inputs = _synthetic(tmp_path, 4, 4)
    chars_a = sum(len(f"a document number {k} " + "x" * (10 * (k + 1))) for k in range(4))
    cfg = _plain(inputs, mix={"enabled": True, "budget_tokens": chars_a, "chars_per_token": 1.0,
                              "allow_upsample": False})
    rep = run_pipeline(cfg, tmp_path / "o")
    assert rep["mix_rates"]["a"] == pytest.approx(0.5) and rep["mix_rates"]["b"] == pytest.approx(chars_a / 2 / chars_a)


def test_tokenize_step_writes_shards(corpus):
    from lmstack.data.shards import open_split, read_index
    from lmstack.tokenizer import Tokenizer, train_tokenizer

    train_tokenizer(EN + ZH, vocab_size=400, out_dir=corpus / "tok", show_progress=False)
    tok = Tokenizer.from_dir(corpus / "tok")
    cfg = _cfg(corpus, tokenize={"enabled": True, "tokenizer": str(corpus / "tok"), "val_documents": 2})
    rep = run_pipeline(cfg, corpus / "o")
    index = read_index(corpus / "o" / "tokens")
    assert index["tokenizer_sha256"] == tok.sha256 and index["splits"]["val"]["documents"] == 2
    assert rep["tokens"]["train_tokens"] == index["splits"]["train"]["tokens"]
    texts = [d["text"] for d in _out(corpus / "o")]
    ref = sorted(tuple(ids) for ids in tok.encode_batch(texts))
    got = []
    for split in ("train", "val"):
        for arr in open_split(corpus / "o" / "tokens", split):
            cut = np.flatnonzero(np.asarray(arr) == tok.eos_token_id)
            got += [tuple(x.tolist()) for x in np.split(np.asarray(arr), cut + 1)[:-1]]
    assert sorted(tuple(g[:-1]) for g in got) == ref


def test_bad_config_and_inputs_fail_before_work(tmp_path, corpus):
    with pytest.raises(ConfigError, match="dedup.threshold"):
        run_pipeline(_cfg(corpus, dedup={"threshold": 1.5}), tmp_path / "o")
    with pytest.raises(ConfigError, match="typo"):
        run_pipeline(_cfg(corpus, typo=1), tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown PII kinds"):
        run_pipeline(_cfg(corpus, pii={"kinds": ["SSN"]}), tmp_path / "o")
    with pytest.raises(DataError, match=r"inputs\[1\].path: input path .*missing does not exist"):
        run_pipeline({"inputs": [{"path": str(corpus / "zh")}, {"path": str(tmp_path / "missing")}]}, tmp_path / "o")
    with pytest.raises(ConfigError, match="blocklist.files"):
        run_pipeline(_cfg(corpus, blocklist={"enabled": True, "files": [str(tmp_path / "nope.txt")]}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_verbs(corpus, capsys):
    cfg = _cfg(corpus)
    (corpus / "p.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert cli_main(["data", "run", "--config", str(corpus / "p.yaml"), "--out", str(corpus / "r"),
                     "dedup.near=false", "workers=1"]) == 0
    assert len(_out(corpus / "r")) == 7
    assert cli_main(["data", "run", "--config", str(corpus / "p.yaml"), "--out", str(corpus / "r"),
                     "dedup.threshold=2"]) == 2
    assert "dedup.threshold" in capsys.readouterr().err
    assert cli_main(["data", "clean", str(corpus / "zh"), "-o", str(corpus / "c"), "--workers", "1"]) == 0
    assert "<CN_ID>" in (corpus / "c" / "data.jsonl").read_text(encoding="utf-8")
    assert cli_main(["data", "dedup", str(corpus / "zh"), str(corpus / "zh" / "0.txt"), "-o", str(corpus / "d"),
                     "--workers", "1"]) == 0
    assert len(_out(corpus / "d")) == 4
    capsys.readouterr()
    assert cli_main(["data", "stats", str(corpus / "web.jsonl.gz"), "--text-field", "content"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["documents"] == 7 and st["languages"] == {"en": 6, "other": 1} and st["read"]["problems"] == {
        "malformed_json": 1}
    assert cli_main(["data", "clean", str(corpus / "nope"), "-o", str(corpus / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_sharded_dedup_then_merge_without_config(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(FIX))
    from gen import corpus as synth

    docs, planted = synth(seed=5, n_en=12, n_zh=8, n_dup_en=4, n_dup_zh=4)
    for k in range(3):
        with open(tmp_path / f"p{k}.jsonl", "w", encoding="utf-8") as f:
            for d in docs[k::3]:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    files = [str(tmp_path / f"p{k}.jsonl") for k in range(3)]
    for i in range(2):
        assert cli_main(["data", "dedup", *files, "-o", str(tmp_path / "o"), "--workers", "1", "--shard", f"{i}/2"]) == 0
    assert "merge --out" in capsys.readouterr().out
    assert cli_main(["data", "merge", "--out", str(tmp_path / "o")]) == 0
    assert cli_main(["data", "dedup", *files, "-o", str(tmp_path / "full"), "--workers", "1"]) == 0
    assert _out(tmp_path / "o") == _out(tmp_path / "full")
    assert len(_out(tmp_path / "full")) <= len(docs) - int(0.9 * len(planted))
    assert cli_main(["data", "merge", "--out", str(tmp_path / "nothing")]) == 2


def test_cli_tokenize_any_input(corpus, capsys):
    from lmstack.data.shards import open_split, read_index
    from lmstack.tokenizer import Tokenizer, train_tokenizer
    from lmstack.utils.io import file_sha256

    train_tokenizer(EN + ZH, vocab_size=400, out_dir=corpus / "tok", show_progress=False)
    tok = Tokenizer.from_dir(corpus / "tok")
    assert cli_main(["data", "tokenize", str(corpus / "zh"), "-t", str(corpus / "tok"), "-o", str(corpus / "t"),
                     "--val-documents", "1", "--shard-tokens", "64"]) == 0
    index = read_index(corpus / "t")
    assert [s["documents"] for s in index["sources"]] == [1, 1, 1, 1]
    assert index["sources"][0]["sha256"] == file_sha256(corpus / "zh" / "0.txt")
    assert index["splits"]["val"]["documents"] == 1 and index["splits"]["train"]["documents"] == 3
    total = sum(len(a) for s in ("train", "val") for a in open_split(corpus / "t", s))
    ref = sum(len(tok.encode((corpus / "zh" / f"{k}.txt").read_text(encoding="utf-8"))) + 1 for k in range(4))
    assert total == ref
    assert cli_main(["data", "tokenize", str(corpus / "zh"), "-t", str(corpus), "-o", str(corpus / "t2")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_docs_example_config_is_valid():
    import re

    from lmstack.data.config import DataPipelineConfig

    md = (Path(__file__).parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", md, re.S) if b.startswith("inputs:"))
    cfg = DataPipelineConfig.model_validate(yaml.safe_load(block))
    assert cfg.inputs[0].weight == 3.0 and cfg.quality.max_dup_ngram_char_frac[10] == 0.10
    assert cfg.pii.action == "redact" and cfg.dedup.threshold == 0.8


def test_inputs_with_no_documents_give_an_empty_output_and_a_report(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "in" / "b.jsonl").write_text("{bad\n", encoding="utf-8")
    rep = run_pipeline({"inputs": [{"path": str(tmp_path / "in")}], "workers": 1}, tmp_path / "o")
    assert rep["documents"] == 0 and (tmp_path / "o" / "data.jsonl").read_text() == ""
    assert rep["read"]["problems"] == {"empty_file": 1, "malformed_json": 1}
    assert any(e.endswith("b.jsonl:1: malformed_json (Expecting property name enclosed in double quotes)")
               for e in rep["read"]["examples"])


def test_builtin_blocklists(tmp_path):
    docs = [EN[0] + " Visit our online casino today.", ZH[0] + "欢迎访问博彩网站。", EN[1], ZH[1],
            EN[2] + " The word casinos alone is fine."]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    rep = run_pipeline({"inputs": [{"path": str(tmp_path / "a.jsonl")}], "workers": 1,
                        "blocklist": {"enabled": True, "builtin": ["en", "zh"]}}, tmp_path / "o")
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["blocklist"]["removed"] == {"blocklisted": 2}
    assert [d["id"] for d in _out(tmp_path / "o")] == ["a/a.jsonl:3", "a/a.jsonl:4", "a/a.jsonl:5"]
