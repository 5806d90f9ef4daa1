"""GRPO and PPO end to end on a toy bandit with a known optimum; the reward model against transformers; the
verifiable rewards; bad configs as one clear line (exit 2)."""

from __future__ import annotations

import json
import pytest
import torch

from lmstack.rl.rewards import exact_answer, json_schema_reward
from tests.conftest import make_hf_model
from tests.engine_fixtures import hf_model

GOOD = 32  # a response token below this id earns 1: a random 256-token policy starts near 1/8, the optimum is 1


def bandit_reward(prompt: str, response: str, record: dict) -> float:
    ids = record["response_ids"]
    return 1.0 if ids and ids[0] < GOOD else 0.0


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_bandit")
    make_hf_model("qwen2", d / "m", initializer_range=0.02)  # a flat start: every token has probability ~1/256
    rows = [{"prompt_ids": [1, 10 + i, 20 + i]} for i in range(8)]
    (d / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def bandit_cfg(bandit, run):
    return dict(model=str(bandit / "m"), method="full", run_dir=str(bandit / run),
                data={"path": str(bandit / "p.jsonl"), "val_path": str(bandit / "p.jsonl"), "val_limit": 8},
                reward={"function": "tests.test_rl_train:bandit_reward"},
                rollout={"max_new_tokens": 1, "kv_cache_memory": 1 << 22, "max_num_seqs": 64},
                train={"steps": 10, "lr": 3e-2, "eval_every": 0})


def sampled_mean_reward(run_dir) -> list[float]:
    return [r["reward_mean"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "reward_mean" in r]


def test_grpo_converges_on_a_bandit(bandit):
    from lmstack.rl.config import GRPOConfig
    from lmstack.rl.grpo import align_grpo

    res = align_grpo(GRPOConfig(**bandit_cfg(bandit, "grpo"), grpo={"group_size": 8, "prompts_per_step": 2,
                                                                     "beta": 0.0}))
    curve = sampled_mean_reward(bandit / "grpo")
    assert curve[0] < 0.4  # a flat policy: ~1/8
    assert sum(curve[-3:]) / 3 > 0.8, curve
    assert res["after"]["val_reward"] == 1.0  # greedy on the held-out prompts: the optimum
    rec = json.loads((bandit / "grpo" / "metrics.jsonl").read_text().splitlines()[1])
    for key in ("reward_mean", "reward_std", "clip_frac", "entropy", "response_len", "loss"):
        assert key in rec
    assert (bandit / "grpo" / "loss.png").is_file() and (bandit / "grpo" / "rewards.png").is_file()
    assert (bandit / "grpo" / "final" / "config.json").is_file()


def test_ppo_converges_on_a_bandit(bandit):
    from lmstack.rl.config import PPOConfig
    from lmstack.rl.ppo import align_ppo

    align_ppo(PPOConfig(**bandit_cfg(bandit, "ppo"), ppo={"prompts_per_step": 16, "kl_coef": 0.01, "ppo_epochs": 1,
                                                        "vf_coef": 0.5}))
    curve = sampled_mean_reward(bandit / "ppo")
    assert curve[0] < 0.4 and sum(curve[-3:]) / 3 > 0.8, curve
    rec = json.loads((bandit / "ppo" / "metrics.jsonl").read_text().splitlines()[1])
    for key in ("kl", "value_loss", "clip_frac", "entropy", "kl_coef"):
        assert key in rec
    assert (bandit / "ppo" / "final" / "value_head.safetensors").is_file()


def test_reward_model_loads_in_transformers_with_the_same_scores(tmp_path):
    import transformers

    from lmstack.model import load_model
    from lmstack.rl.reward_model import RewardModel, load_reward_model, save_reward_model

    hf_model("llama", tmp_path / "m")
    rm = RewardModel(load_model(tmp_path / "m", dtype=torch.float32))
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    save_reward_model(rm, tmp_path / "rm")
    ids = torch.tensor([[1, 5, 9, 11, 13], [1, 7, 8, 0, 0]])  # pad_token_id 0: right padding
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(rm(ids, mask), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_reward_model(tmp_path / "rm")(ids, mask), want, atol=1e-5, rtol=1e-5)


def test_reward_model_learns_held_out_preferences(tmp_path):
    """Pairs whose preferred reply is the longer one: Bradley-Terry training must rank held-out pairs."""
    from lmstack.rl.config import RewardConfig
    from lmstack.rl.reward_model import train_reward
    from tests.engine_fixtures import text_model_dir

    text_model_dir(tmp_path / "m")
    words = ["fox", "dog", "token", "model", "cache", "batch", "world", "tiny"]
    rows = [{"prompt": f"say {w}", "chosen": f"{w} {w} {w} {w} {w} {w}", "rejected": w} for w in words * 4]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    val = [{"prompt": f"say {w}", "chosen": f"{w} {w} {w} {w} {w}", "rejected": f"{w}"} for w in ["quick", "lazy"]]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in val))
    cfg = RewardConfig(model=str(tmp_path / "m"), run_dir=str(tmp_path / "rm"),
                       data={"path": str(tmp_path / "pairs.jsonl"), "val_path": str(tmp_path / "val.jsonl"),
                             "batch_size": 8, "max_len": 64},
                       reward={"margin": 0.5}, train={"steps": 12, "lr": 2e-3})
    train_reward(cfg)
    ev = json.loads((tmp_path / "rm" / "reward_eval.json").read_text())
    assert ev["before"]["accuracy"] == 0.0  # a zero head: every reward ties
    assert ev["after"]["accuracy"] == 1.0
    cfg_json = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert cfg_json["architectures"] == ["Qwen2ForSequenceClassification"] and cfg_json["num_labels"] == 1

    # PPO / GRPO score a rollout the way the pairs were trained: prompt + reply through the chat template, its
    # end-of-turn included -- not prompt ids + sampled ids, which end on <|im_end|> (or mid-reply when cut off)
    from lmstack.rl.config import RewardSpec
    from lmstack.rl.policy import Scorer
    from lmstack.rl.reward_model import load_reward_model
    from lmstack.rl.rollout import Rollout
    from lmstack.tokenizer import Tokenizer
    from lmstack.tune.data import _reply_example

    tok = Tokenizer.from_dir(tmp_path / "m")
    rm = load_reward_model(tmp_path / "rm" / "final", device="cpu", dtype=torch.float32)
    scorer = Scorer(RewardSpec(model=str(tmp_path / "rm" / "final")), tok, torch.device("cpu"), tok.vocab_size)
    end = tok.token_to_id("<|im_end|>")
    user = [{"role": "user", "content": "say quick"}]
    prompt_ids = list(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    rolls, want = [], []
    for reply in ("quick quick quick quick quick", "quick"):
        rolls.append(Rollout(prompt_ids, tok.encode(reply, add_special_tokens=False) + [end], [], reply,
                             record={"prompt": "say quick"}))
        ex, _ = _reply_example(tok, user, [{"role": "assistant", "content": reply}], 64)  # the training form
        with torch.no_grad():
            want.append(float(rm(torch.tensor([ex.input_ids]), torch.ones(1, len(ex.input_ids), dtype=torch.long))[0]))
    got = scorer(rolls, ["say quick"] * 2)
    assert got == pytest.approx(want, abs=1e-5) and got[0] > got[1]
    assert tok.decode(scorer.rm_input(rolls[0])[len(prompt_ids):]).endswith("<|im_end|>\n")


def test_verifiable_rewards():
    assert exact_answer("", "The answer is 1,234.", {"answer": "1234"}) == 1.0
    assert exact_answer("", "12 + 3 = 15", {"answer": "15"}) == 1.0
    assert exact_answer("", "15 or 16", {"answer": "15"}) == 0.0  # the last number counts
    assert exact_answer("", "no number", {"answer": "15"}) == 0.0
    assert exact_answer("", "Paris\nbecause", {"answer": "Paris"}) == 1.0
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = json_schema_reward(schema)
    assert r("", 'Sure: {"n": 3}', {}) == 1.0
    assert r("", '{"n": "three"}', {}) == 0.5
    assert r("", "no json here", {}) == 0.0


def test_unit_test_reward_runs_in_the_sandbox():
    from lmstack.eval.sandbox import SandboxUnavailable
    from lmstack.rl.rewards import unit_tests

    rec = {"tests": "assert add(2, 3) == 5"}
    try:
        good = unit_tests("", "```python\ndef add(a, b):\n    return a + b\n```", rec)
    except SandboxUnavailable as e:
        pytest.skip(str(e))
    assert good == 1.0
    assert unit_tests("", "def add(a, b):\n    return a - b\n", rec) == 0.0


@pytest.mark.parametrize("args,msg", [
    (["grpo", "--grpo.group_size", "1"], "grpo.group_size"),
    (["ppo", "--ppo.kl_coef=-0.1"], "ppo.kl_coef"),
    (["grpo", "--grpo.beta=-1"], "grpo.beta"),
    (["ppo"], "reward: missing"),
    (["grpo", "--reward-fn", "no_such_reward"], "no_such_reward"),
])
def test_bad_config_is_one_clear_line(bandit, args, msg, capsys):
    from lmstack.cli import main

    extra = [] if "reward" in msg or "--reward-fn" in args else ["--reward-fn", "exact_answer"]
    rc = main(["align", *args, "--model", str(bandit / "m"), "--data", str(bandit / "p.jsonl"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err


def test_the_recipe_and_the_pipeline_stages_validate():
    """recipes/rl-arithmetic.yaml's sections are valid configs with the arith app's wiring; an app's grpo stage
    takes its wiring."""
    from pathlib import Path

    from lmstack.apps.arith.pipeline import APP
    from lmstack.pipeline import load_recipe
    from lmstack.pipeline.recipe import Recipe
    from lmstack.pipeline.stages import rl_stage

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "rl-arithmetic.yaml"))
    g = APP.registry["grpo"].configure(recipe)
    assert g.grpo.loss_type == "dapo" and g.reward.function == "exact_answer" and g.run_dir == "runs/rl-arith/grpo"
    assert g.model == "runs/rl-arith/finetune/final" and g.data.val_path == "runs/rl-arith/data/heldout.jsonl"
    assert APP.registry["ppo"].configure(recipe).ppo.ppo_epochs == 2
    assert APP.registry["finetune"].configure(recipe).method == "full"
    stage = rl_stage("grpo", wire=lambda r: {"model": "runs/x/sft", "data": {"path": "p.jsonl"}})
    cfg = stage.configure(Recipe(name="x", grpo={"reward": {"function": "exact_answer"}, "grpo": {"group_size": 3}}))
    assert cfg.model == "runs/x/sft" and cfg.grpo.group_size == 3 and cfg.run_dir == "runs/x/grpo"
