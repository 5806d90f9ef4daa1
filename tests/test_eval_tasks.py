"""Tasks on a tiny random model, checked against transformers (and peft) computing the same quantities."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from lmstack.eval.lm import EvalLM
from lmstack.eval.run import run_eval
from lmstack.eval.task import load_task
from tests.eval_fixtures import make_model_dir, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

PPL_TEXT = ("The river town woke slowly in the grey light of early spring. Fishermen carried their nets down to "
            "the water, and the smell of fresh bread drifted along the narrow streets. 中国的首都是北京。")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import transformers

    d = make_model_dir(tmp_path_factory.mktemp("eval_model"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    lm = EvalLM.load(d)
    return d, hf, tok, lm


def _hf_logprob(hf, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) with transformers, tokenised as lm-eval does (whole, then split)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- perplexity
def test_perplexity_equals_exp_mean_nll_from_transformers(env, tmp_path):
    d, hf, tok, lm = env
    f = _write(tmp_path / "t.txt", PPL_TEXT)
    ids = [tok.bos_token_id] + tok(PPL_TEXT, add_special_tokens=False).input_ids
    assert len(ids) < 256
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    r = run_eval(d, [{"type": "perplexity", "name": "p", "data": str(f), "max_length": 256, "stride": 256}],
                 lm=lm, show_progress=False)["tasks"]["p"]
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert r["n_tokens"] == len(ids) - 1
    assert r["metrics"]["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / math.log(2)
                                                          / len(PPL_TEXT.encode("utf-8")), rel=1e-4)


def test_sliding_window_perplexity_equals_the_transformers_guide_loop(env, tmp_path):
    d, hf, tok, lm = env
    text = PPL_TEXT * 3
    f = _write(tmp_path / "t.txt", text)
    ids = torch.tensor([tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids)
    max_length, stride, n = 64, 24, len(ids)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):  # huggingface.co/docs/transformers/perplexity
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        inp = ids[begin:end][None]
        target = inp.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(inp, labels=target).loss.item()
        valid = int((target[0, 1:] != -100).sum())
        nll += loss * valid
        count += valid
        prev_end = end
        if end == n:
            break
    r = run_eval(d, [{"type": "perplexity", "name": "p", "data": str(f), "max_length": max_length,
                      "stride": stride}], lm=lm, show_progress=False)["tasks"]["p"]
    assert r["n_tokens"] == count == n - 1
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert r["metrics"]["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-4)


def test_token_shards_score_like_the_same_text(env, tmp_path):
    d, hf, tok, lm = env
    f = _write(tmp_path / "t.txt", PPL_TEXT)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    ids = np.array(tok(PPL_TEXT, add_special_tokens=False).input_ids, dtype=np.uint16)
    ids.tofile(shard_dir / "train_000.bin")
    (shard_dir / "index.json").write_text(json.dumps({"dtype": "uint16", "tokens": len(ids)}))
    tasks = [{"type": "perplexity", "name": "txt", "data": str(f), "max_length": 64, "stride": 32},
             {"type": "perplexity", "name": "bin", "data": str(shard_dir), "max_length": 64, "stride": 32}]
    r = run_eval(d, tasks, lm=lm, show_progress=False)["tasks"]
    assert r["bin"]["metrics"]["perplexity"] == pytest.approx(r["txt"]["metrics"]["perplexity"], rel=1e-6)
    assert r["bin"]["n_bytes"] == r["txt"]["n_bytes"] == len(PPL_TEXT.encode())


# ---------------------------------------------------------------------------------------------- choices
def test_multiple_choice_predictions_equal_transformers_argmax(env):
    d, hf, tok, lm = env
    r = run_eval(d, ["mc_en"], lm=lm, limit=6, show_progress=False)["tasks"]["mc_en"]
    rows = [json.loads(x) for x in open(load_task("mc_en").data, encoding="utf-8")][:6]
    correct = 0
    preds = []
    for row in rows:
        ctx = ("The following are multiple choice questions (with answers) about general knowledge.\n\n"
               + row["question"] + "\n" + "\n".join(f"{L}. {c}" for L, c in zip("ABCD", row["choices"]))
               + "\nAnswer:")
        lls = [_hf_logprob(hf, tok, ctx, f" {L}") for L in "ABCD"]
        preds.append(int(np.argmax(lls)))
        correct += "ABCD"[preds[-1]] == row["answer"]
    assert r["n"] == 6
    assert r["metrics"]["acc"] == pytest.approx(correct / 6)


def test_multiple_choice_samples_and_text_continuations_equal_transformers(env, tmp_path):
    d, hf, tok, lm = env
    from lmstack.eval.choice import evaluate_multiple_choice

    task = load_task("mc_en_text")
    task.limit = 4
    res = evaluate_multiple_choice(lm, task)
    rows = [json.loads(x) for x in open(task.data, encoding="utf-8")][:4]
    for s, row in zip(res["samples"], rows):
        ctx = f"Question: {row['question']}\nAnswer:"
        lls = [_hf_logprob(hf, tok, ctx, " " + c) for c in row["choices"]]
        np.testing.assert_allclose(s["loglikelihoods"], lls, atol=2e-3)
        assert s["pred"] == int(np.argmax(lls))
        assert s["pred_norm"] == int(np.argmax(np.array(lls) / np.array([len(c) for c in row["choices"]])))


def test_mmlu_headerless_csv_ceval_csv_and_k_shot_prompts(env, tmp_path):
    d, hf, tok, lm = env
    from lmstack.eval.choice import mc_requests

    csv = _write(tmp_path / "mmlu.csv", "What is 1+1?,1,2,3,4,B\n\"Pick, the third\",x,y,z,w,C\n2+2?,4,5,6,7,A\n")
    t = load_task({"type": "multiple_choice", "name": "m", "data": str(csv), "csv_header": False,
                   "subject": "math", "num_fewshot": 2})
    items, pairs, _ = mc_requests(t)
    assert [it["gold"] for it in items] == [1, 2, 0]
    ctx = pairs[0][0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about math.\n\n")
    assert ctx.count("Answer:") == 3 and ctx.endswith("What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert "Pick, the third\nA. x" in ctx  # the quoted comma survived CSV parsing
    assert [p[1] for p in pairs[:4]] == [" A", " B", " C", " D"]
    zh_items, zh_pairs, _ = mc_requests(load_task("mc_zh"))
    assert len(zh_items) == 16 and [it["gold"] for it in zh_items[:5]] == [0, 1, 2, 3, 0]
    assert zh_pairs[0][0].endswith("中国的首都是哪座城市？\nA. 北京\nB. 上海\nC. 广州\nD. 深圳\nAnswer:")
    assert zh_pairs[4 * 8][0].endswith("计算机中,1 KB 等于多少字节？\nA. 1024\nB. 100\nC. 512\nD. 1000\nAnswer:")


def test_classification_equals_transformers_argmax_and_sklearn_macro_f1(env):
    d, hf, tok, lm = env
    from sklearn.metrics import f1_score

    r = run_eval(d, ["intents"], lm=lm, limit=5, show_progress=False)["tasks"]["intents"]
    labels = ["account", "billing", "refund", "shipping", "technical"]
    rows = [json.loads(x) for x in open(load_task("intents").data, encoding="utf-8")][:5]
    preds = [labels[int(np.argmax([_hf_logprob(hf, tok, f"Message: {row['text']}\nIntent:", f" {lab}")
                                   for lab in labels]))] for row in rows]
    gold = [row["label"] for row in rows]
    assert r["metrics"]["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(preds, gold)]))
    assert r["metrics"]["macro_f1"] == pytest.approx(
        f1_score(gold, preds, labels=labels, average="macro", zero_division=0))


# ---------------------------------------------------------------------------------------------- generation
def test_generation_runs_on_the_serving_engine_and_equals_transformers_greedy(env):
    """Evaluation has no decoder of its own: EvalLM.generate goes through lmstack.serve (batched, paged KV) and
    gives transformers' greedy tokens; without an engine attached it says how to attach one."""
    from lmstack.errors import ConfigError
    from lmstack.serve.evaluation import generate

    d, hf, tok, lm = env
    eng = EvalLM(lm.model, lm.tok, model_dir=str(d), engine=generate)
    prompts = ["Question: What is the answer?\nAnswer:", "def add(a, b):", "中国的首都是"]
    outs = eng.generate(prompts, max_tokens=8)
    for p, (o,) in zip(prompts, outs):
        ids = tok(p, add_special_tokens=False).input_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=eng.eos_ids,
                              pad_token_id=0)[0, len(ids):].tolist()
        ref = ref[:min([ref.index(e) for e in eng.eos_ids if e in ref] or [len(ref)])]
        assert o == tok.decode(ref, skip_special_tokens=True)
    cut = eng.generate(prompts, max_tokens=8, stop=["e"])
    assert all("e" not in c[0] and o[0].startswith(c[0]) for c, o in zip(cut, outs))
    with pytest.raises(ConfigError, match="serving engine"):
        EvalLM(lm.model, lm.tok).generate(prompts)


def test_chat_template_prompt_equals_transformers(env):
    d, hf, tok, lm = env
    from lmstack.eval.generation import build_prompt
    from lmstack.eval.records import read_records

    task = load_task("support_qa")
    rec = read_records(task.data, task.name).items[0]
    msgs = [{"role": "system", "content": task.system}, {"role": "user", "content": rec.data["question"]}]
    assert build_prompt(lm, task, rec, []) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_generation_task_scores_what_the_model_said(env, monkeypatch):
    d, hf, tok, lm = env
    seen = {}

    def fake_generate(prompts, **kw):
        seen["prompts"], seen["kw"] = prompts, kw
        return [["Paris"], ["8 legs"], ["purple"]]

    monkeypatch.setattr(lm, "generate", fake_generate)
    r = run_eval(d, ["qa_en"], lm=lm, limit=3, show_progress=False)["tasks"]["qa_en"]
    assert seen["prompts"][0] == "Question: What is the capital of France?\nAnswer:"
    assert seen["kw"]["stop"] == ["\n"] and seen["kw"]["max_tokens"] == 16
    assert r["metrics"]["exact_match"] == pytest.approx(1 / 3)
    assert r["metrics"]["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # "8 legs" vs "8": P=1/2, R=1


# ---------------------------------------------------------------------------------------------- adapters
def test_lora_adapter_perplexity_equals_peft(env, tmp_path):
    d, hf, tok, lm = env
    peft = pytest.importorskip("peft")
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "ad")
    f = _write(tmp_path / "t.txt", PPL_TEXT)
    ids = torch.tensor([[tok.bos_token_id] + tok(PPL_TEXT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        loss_peft = pm(ids, labels=ids).loss.item()
        loss_base = hf(ids, labels=ids).loss.item()
    assert abs(loss_peft - loss_base) > 1e-3  # the adapter changes the model
    r = run_eval(d, [{"type": "perplexity", "name": "p", "data": str(f), "max_length": 256, "stride": 256}],
                 adapter=tmp_path / "ad", show_progress=False)
    assert r["tasks"]["p"]["metrics"]["perplexity"] == pytest.approx(math.exp(loss_peft), rel=1e-4)
    assert r["adapter"]["sha256"]


# ---------------------------------------------------------------------------------------------- results
def test_results_record_provenance_and_reports(env, tmp_path):
    d, hf, tok, lm = env
    out = tmp_path / "run"
    res = run_eval(d, ["mc_en", "ppl_zh"], out, lm=lm, limit=3, show_progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["model"]["weights_sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    data = load_task("mc_en").data
    assert saved["tasks"]["mc_en"]["data_sha256"] == hashlib.sha256(open(data, "rb").read()).hexdigest()
    import lmstack

    assert saved["lmstack_version"] == lmstack.__version__
    assert saved["model"]["path"] == str(d.resolve())
    md = (out / "report.md").read_text()
    assert "| mc_en | multiple_choice | acc |" in md and "| ppl_zh | perplexity | perplexity |" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html
    assert len((out / "samples" / "mc_en.jsonl").read_text().splitlines()) == 3


def test_prompt_tuning_adapter_perplexity_equals_peft(env, tmp_path):
    d, hf, tok, lm = env
    peft = pytest.importorskip("peft")
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    pm.save_pretrained(tmp_path / "pt")
    f = _write(tmp_path / "t.txt", PPL_TEXT)
    ids = torch.tensor([[tok.bos_token_id] + tok(PPL_TEXT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = pm(input_ids=ids).logits[0]  # (4 virtual + T, V)
        loss_base = hf(ids, labels=ids).loss.item()
    assert logits.shape[0] == 4 + ids.shape[1]
    # score real tokens 1..T-1 (BOS is context, as in lmstack); peft's own loss also scores BOS after the prompt
    logp = torch.log_softmax(logits[4:-1], -1).gather(1, ids[0, 1:, None])
    loss_peft = -logp.mean().item()
    assert abs(loss_peft - loss_base) > 1e-3
    r = run_eval(d, [{"type": "perplexity", "name": "p", "data": str(f), "max_length": 200, "stride": 200}],
                 adapter=tmp_path / "pt", show_progress=False)
    assert r["tasks"]["p"]["metrics"]["perplexity"] == pytest.approx(math.exp(loss_peft), rel=1e-4)


def test_model_saved_by_lmstack_with_its_chatml_tokenizer(tmp_path):
    """A directory lmstack itself writes (train_tokenizer + save_model): chat prompts use the tokenizer's own
    template renderer ({% generation %} tags) and generation stops at the end-of-turn marker."""
    from lmstack.model import ModelConfig, build_model, save_model
    from lmstack.tokenizer import Tokenizer, train_tokenizer
    from tests.eval_fixtures import CORPUS

    tok = train_tokenizer(iter(CORPUS * 3), 320, tmp_path / "tok", show_progress=False)
    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    save_model(build_model(cfg), tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    lm = EvalLM.load(tmp_path / "m")
    t = Tokenizer.from_dir(tmp_path / "tok")
    import re

    assert re.search(r"\{%-?\s*generation\s*-?%\}", t.chat_template)  # needs lmstack's renderer, not plain jinja
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my order?"}]
    assert lm.tok.apply_chat_template(msgs, add_generation_prompt=True) == t.apply_chat_template(
        msgs, add_generation_prompt=True)
    assert t.encode("<|im_end|>")[0] in lm.eos_ids
    from lmstack.serve.evaluation import generate

    r = run_eval(tmp_path / "m", ["support_qa"], lm=lm, engine=generate, limit=2,
                 show_progress=False)["tasks"]["support_qa"]
    assert r["n"] == 2 and set(r["metrics"]) == {"exact_match", "f1", "bleu", "rougeL"}
    del tok


def test_long_requests_are_truncated_on_the_left_like_lm_eval(env):
    d, hf, tok, lm = env
    short = EvalLM(lm.model, lm.tok, max_length=16)
    ids = tok(PPL_TEXT, add_special_tokens=False).input_ids[:40]
    ctx, cont = ids[:37], ids[37:]
    (score, _), = short.loglikelihood_tokens([(ctx, cont)])
    window = torch.tensor([ids[-17:]])  # 16 input tokens predicting the last 16, of which 3 are scored
    with torch.no_grad():
        logp = torch.log_softmax(hf(window[:, :-1]).logits[0], -1)
    assert score == pytest.approx(float(sum(logp[13 + i, t] for i, t in enumerate(cont))), rel=1e-5)
    (score_all, _), = short.loglikelihood_tokens([(ids[:2], ids[2:40])])  # continuation longer than the window
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids[-17:-1]])).logits[0], -1)
    assert score_all == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(ids[-16:]))), rel=1e-5)


def test_shared_prefix_scoring_equals_scoring_each_request_whole(env):
    d, hf, tok, lm = env
    import random

    rng = random.Random(0)
    ids = tok(PPL_TEXT * 4, add_special_tokens=False).input_ids
    assert len(ids) > 310
    reqs = []
    for _ in range(7):  # contexts of different lengths, each with 1-4 continuations of 1-6 tokens
        a = rng.randrange(0, len(ids) - 60)
        ctx = ids[a:a + rng.randrange(1, 40)]
        for _ in range(rng.randrange(1, 5)):
            b = rng.randrange(0, len(ids) - 6)
            reqs.append((ctx, ids[b:b + rng.randrange(1, 7)]))
    reqs.append((ids[:300], ids[300:303]))  # truncated on the left (max_length 256) and shared
    reqs.append((ids[:300], ids[303:305]))
    shared = EvalLM(lm.model, lm.tok, share_prefix=True)
    whole = EvalLM(lm.model, lm.tok, share_prefix=False, batch_tokens=64)
    a, b = shared.loglikelihood_tokens(reqs), whole.loglikelihood_tokens(reqs)
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], rtol=1e-5, atol=1e-4)
    assert [x[1] for x in a] == [x[1] for x in b]
    # and against transformers for one shared group
    (c, x0), (_, x1) = reqs[-2], reqs[-1]
    for (ctx, cont), (score, _) in zip([(c, x0), (c, x1)], a[-2:]):
        window = (ctx + cont)[-257:]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([window[:-1]])).logits[0], -1)
        n = len(window) - 1
        assert score == pytest.approx(float(sum(logp[n - len(cont) + i, t] for i, t in enumerate(cont))), rel=1e-5)
