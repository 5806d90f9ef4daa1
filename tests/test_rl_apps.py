"""The RL demonstrations as apps: recipes/rl-arithmetic.yaml (a micro model trained from nothing, GRPO and PPO,
held-out accuracy per language with Wilson intervals) and recipes/rl-support.yaml (preference pairs from a
support run, a reward model, PPO on the assistant's LoRA, the support scores), each end to end at a reduced
size; the statistics against scipy; the pairs against their definitions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("k,n", [(0, 40), (7, 200), (100, 200), (199, 200), (200, 200), (33, 61)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    from lmstack.apps.arith.stages import wilson

    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n, 1.959963984540054)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


@pytest.mark.parametrize("k1,n1,k2,n2", [(40, 200, 62, 200), (10, 180, 11, 190), (0, 50, 5, 50)])
def test_two_proportion_test_is_pearsons_chi_square(k1, n1, k2, n2):
    from scipy.stats import chi2_contingency

    from lmstack.apps.arith.stages import two_proportion_p

    ref = chi2_contingency([[k1, n1 - k1], [k2, n2 - k2]], correction=False).pvalue
    assert two_proportion_p(k1, n1, k2, n2) == pytest.approx(ref, rel=1e-9)


def test_split_digits_tokenizer_gives_one_token_per_digit(tmp_path):
    from lmstack.tokenizer.train import train_tokenizer

    texts = [f"What is {a} + {b}? {a + b}" for a in range(10, 99, 3) for b in range(10, 99, 7)] * 3
    plain = train_tokenizer(iter(texts), 400, show_progress=False)
    split = train_tokenizer(iter(texts), 400, show_progress=False, split_digits=True)
    pieces = [split.decode([t]) for t in split.encode("12 + 345 = 357")]
    assert [p.strip() for p in pieces if p.strip().isdigit()] == list("12345357")
    assert any(len(plain.decode([t]).strip()) > 1 and plain.decode([t]).strip().isdigit()
               for t in plain.encode("12 + 345 = 357"))  # the default keeps digit groups (cl100k)
    assert split.decode(split.encode("计算 12 - 3，只给出结果。")) == "计算 12 - 3，只给出结果。"


# ------------------------------------------------------------------------------------------------ arithmetic
def test_arithmetic_recipe_end_to_end_reduced(tmp_path):
    """The shipped recipe at a reduced size: every stage runs, the report's SFT row is what the RL runs measured
    before training, and the engine's greedy answers are transformers' greedy answers for the same model."""
    import torch
    import transformers

    from lmstack.pipeline import load_recipe, run_recipe

    over = [f"run_dir={tmp_path / 'run'}", "data.n_sft=200", "data.n_train=40", "data.n_heldout=30",
            "finetune.train.steps=2", "finetune.train.warmup_steps=1", "finetune.data.batch_size=16",
            "grpo.train.steps=2", "grpo.grpo.prompts_per_step=2", "grpo.grpo.group_size=4", "grpo.train.eval_every=0",
            "ppo.train.steps=1", "ppo.ppo.prompts_per_step=8"]
    res = run_recipe(load_recipe(ROOT / "recipes" / "rl-arithmetic.yaml", over), show_progress=False)
    rep = res.summary("report")
    sft, grpo = rep["systems"]["sft"], rep["systems"]["grpo"]
    assert set(sft) == {"all", "en", "zh"} and sft["en"]["n"] + sft["zh"]["n"] == sft["all"]["n"] == 30
    for row in (sft, grpo, rep["systems"]["ppo"]):
        for v in (row["all"], row["en"], row["zh"]):
            assert v["ci"][0] <= v["accuracy"] <= v["ci"][1] and v["correct"] == round(v["accuracy"] * v["n"])
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy_en" in r and "val_accuracy_zh" in r for r in recs)
    assert any("kl" in r and "reward_mean" in r for r in recs)
    assert (run / "report" / "accuracy.png").is_file() and (run / "grpo" / "rewards.png").is_file()

    # the held-out answers the report counts = transformers' greedy decoding of the same SFT model
    ev = json.loads((run / "grpo" / "rl_eval.json").read_text())
    sft_dir = run / "finetune" / "final"
    tok = transformers.AutoTokenizer.from_pretrained(sft_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(sft_dir, torch_dtype=torch.float32).eval()
    for s in ev["before"]["samples"]:
        text = tok.apply_chat_template([{"role": "user", "content": s["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                          pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == s["response"]


def test_arithmetic_recipe_bad_stage_order_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    r = tmp_path / "r.yaml"
    r.write_text("name: t\napp: arith\nstages: [data, grpo]\n")
    p = subprocess.run([sys.executable, "-m", "lmstack.cli", "run", str(r)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "grpo stage needs the finetune stage" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ support
SYSTEM = "You are the support assistant of a shop. Answer briefly.\n\nKnowledge base:\n"


def _support_run(root: Path) -> Path:
    """A support run's rag/ files in the support app's format (grounded chats with citations, held-out rows)."""
    from tests.serve_fixtures import tiny_model_dir

    products = [("Kettle", "steel", 42), ("Lamp", "ceramic", 79), ("Clock", "oak", 35), ("Mug", "stone", 12)]
    passages = {n: f"{n} (LH-{i}): a good {n.lower()}.\nThe {n} costs ${p}. The {n} is made of {m}."
                for i, (n, m, p) in enumerate(products)}
    chats, held = [], []
    for i, (n, m, p) in enumerate(products * 3):
        shown = [n] + [o for o, _, _ in products if o != n][:2]
        shown = shown[i % 3:] + shown[:i % 3]
        k = shown.index(n) + 1
        sys_msg = SYSTEM + "\n".join(f"[{j}] {passages[s]}" for j, s in enumerate(shown, 1))
        q, a = ((f"How much is the {n}?", f"The {n} costs ${p}.") if i % 2 else
                (f"What is the {n} made of?", f"The {n} is made of {m}."))
        chats.append({"messages": [{"role": "system", "content": sys_msg}, {"role": "user", "content": q},
                                   {"role": "assistant", "content": f"{a} [{k}]"}]})
        held.append({"id": f"q{i}", "lang": "en", "question": q + " Please.", "answer": a, "gold": f"product/{n}",
                     "context": [f"product/{s}" for s in shown],
                     "messages": [{"role": "system", "content": sys_msg}, {"role": "user", "content": q + " Please."}]})
    chats.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "Hello! How can I help?"}]})  # no citation: skipped
    rag = root / "rag"
    rag.mkdir(parents=True)
    for name, rows in (("sft_train", chats), ("heldout_qa", held)):
        (rag / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_model_dir(root / "base" / "model", max_position_embeddings=512)
    return root


def test_support_pairs_follow_their_definitions(tmp_path):
    from lmstack.apps.rlsupport.stages import passages
    from lmstack.pipeline import load_recipe, run_recipe

    src = _support_run(tmp_path / "support")
    over = [f"run_dir={tmp_path / 'run'}", "stages=[pairs]", f"pairs.support_run={src}", "pairs.train_pairs=12",
            "pairs.heldout_pairs=12", "pairs.heldout_prompts=5"]
    res = run_recipe(load_recipe(ROOT / "recipes" / "rl-support.yaml", over), show_progress=False)
    m = res.summary("pairs")
    assert m["train_pairs"] == 12 and m["heldout_pairs"] == 12 and m["heldout_prompts"] == 5
    assert all(v >= 2 for v in m["kinds"].values())  # the four kinds in turn
    held_questions = {json.loads(x)["question"] for x in (src / "rag" / "heldout_qa.jsonl").read_text().splitlines()}
    for name in ("train_pairs", "heldout_pairs"):
        for line in (tmp_path / "run" / "pairs" / f"{name}.jsonl").read_text().splitlines():
            p = json.loads(line)
            shown = passages(p["prompt"][0]["content"])
            assert (p["prompt"][1]["content"] in held_questions) == (name == "heldout_pairs")
            text, k = re.fullmatch(r"(.*) \[(\d)\]", p["chosen"]).groups()
            assert text in shown[int(k)]  # chosen: the passage it cites states it
            bad = re.fullmatch(r"(.*) \[(\d)\]", p["rejected"])
            if p["kind"] == "ungrounded":
                assert bad is None
            elif p["kind"] == "wrong_citation":
                assert bad.group(1) == text and bad.group(2) != k
            elif p["kind"] == "wrong_passage":
                assert bad.group(2) != k and bad.group(1) in shown[int(bad.group(2))]
                assert bad.group(1) not in shown[int(k)]
            else:
                assert bad.group(2) == k and bad.group(1) != text
                assert re.sub(r"\d+", "#", bad.group(1)) == re.sub(r"\d+", "#", text)


def test_support_scores_against_hand_counts():
    from lmstack.apps.rlsupport.stages import support_scores

    prompts = [{"answer": "The Lamp costs $79.", "k": 2, "lang": "en"},
               {"answer": "The Lamp costs $79.", "k": 2, "lang": "en"},
               {"answer": "台灯售价79美元。", "k": 1, "lang": "zh"},
               {"answer": "The Mug is made of stone.", "k": 3, "lang": "en"}]
    answers = ["The Lamp costs $79. [2]", "The Lamp costs $80. [1]", "台灯售价79美元。", "The Mug is stone. [3]"]
    s = support_scores(prompts, answers)
    assert s["all"]["n"] == 4 and s["en"]["n"] == 3 and s["zh"]["n"] == 1
    assert s["all"]["exact_match"] == pytest.approx(2 / 4)  # 1st and 3rd (citation removed)
    assert s["all"]["cited"] == pytest.approx(3 / 4)
    assert s["all"]["citation_correct"] == pytest.approx(2 / 3)  # [2] right, [1] wrong, [3] right
    # F1: SQuAD tokens (lowercase, no punctuation / articles): 2nd "lamp costs 80" vs "lamp costs 79" = 2/3;
    # 4th "mug is stone" vs "mug is made of stone": precision 3/3, recall 3/5 -> 0.75
    assert s["en"]["f1"] == pytest.approx((1 + 2 / 3 + 0.75) / 3)


def test_support_recipe_end_to_end_reduced(tmp_path):
    from lmstack.pipeline import load_recipe, run_recipe

    src = _support_run(tmp_path / "support")
    over = [f"run_dir={tmp_path / 'run'}", f"pairs.support_run={src}", "pairs.train_pairs=8", "pairs.heldout_pairs=4",
            "pairs.ppo_prompts=8", "pairs.heldout_prompts=3", "policy.reward_layers=1", "reward.train.steps=2",
            "reward.train.log_every=1", "ppo.train.steps=1", "ppo.ppo.prompts_per_step=2", "ppo.rollout.max_new_tokens=4",
            "ppo.lora.layers_to_transform=[-1]", "eval.max_tokens=4"]
    res = run_recipe(load_recipe(ROOT / "recipes" / "rl-support.yaml", over), show_progress=False)
    assert res.summary("policy")["reward_backbone_layers"] == 1
    run = tmp_path / "run"
    assert json.loads((run / "policy" / "rm_init" / "config.json").read_text())["num_hidden_layers"] == 1
    assert "accuracy" in json.loads((run / "reward" / "reward_eval.json").read_text())["after"]
    sys_ = res.summary("eval")["systems"]
    assert set(sys_) == {"sft", "ppo"}
    for v in sys_.values():
        assert v["all"]["n"] == 3 and 0 <= v["all"]["f1"] <= 1 and isinstance(v["reward"], float)
    assert (run / "ppo" / "final" / "adapter_config.json").is_file()
