"""End-to-end fine-tuning runs on a tiny model: SFT (LoRA, QLoRA, prompt, prefix, full), DPO, distillation,
merge, and the CLI. Each run uses ``lmstack.train.fit`` (checkpoints, metrics) like pretraining."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.config import validate
from lmstack.model import load_model
from lmstack.tune.adapters import load_adapter
from lmstack.tune.batches import collate_sft
from lmstack.tune.config import DistillConfig, DPOConfig, FinetuneConfig
from lmstack.tune.data import load_sft
from lmstack.tune.losses import forward_logits, token_ce
from lmstack.tune.adapters import load_prompt_encoder
from lmstack.tune.prompt import PrefixContext, PromptTunedModel
from tests.tune_fixtures import PAIR_ROWS, SFT_ROWS, make_model_dir, write_jsonl

torch.set_num_threads(2)
TRAIN = {"steps": 8, "lr": 2e-2, "warmup_steps": 1, "log_every": 4, "eval_every": 8, "ckpt_every": 4,
         "tensorboard": False, "plot": False, "peak_flops": 1e12}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_train")
    mdir = make_model_dir(root / "model")
    sft = write_jsonl(root / "sft.jsonl", SFT_ROWS * 2 + ['{"oops"'])
    pairs = write_jsonl(root / "pairs.jsonl", PAIR_ROWS * 2)
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(mdir)
    ex, _ = load_sft(sft, tok, 256)
    return {"root": root, "model": mdir, "sft": sft, "pairs": pairs, "batch": collate_sft(ex, tok.pad_token_id)}


def _sft_loss(model, batch):
    with torch.no_grad():
        return float(token_ce(forward_logits(model, batch), batch["labels"])[0])


def _finetune(env, method, **kw):
    from lmstack.tune.sft import finetune

    cfg = validate(FinetuneConfig, {"model": str(env["model"]), "method": method,
                                    "run_dir": str(env["root"] / f"run_{method}"),
                                    "data": {"path": str(env["sft"]), "val_fraction": 0.2, "max_len": 256},
                                    "train": TRAIN, **kw})
    return finetune(cfg)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_sft_loss_goes_down_and_adapter_reloads(env, method):
    res = _finetune(env, method, lora={"r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0})
    assert res.steps == 8 and res.best_val_loss is not None
    assert (res.final_dir / "adapter_config.json").is_file() and (res.final_dir / "tokenizer.json").is_file()
    assert (env["root"] / f"run_{method}" / "checkpoints" / "step_000008" / "trainer_state.pt").is_file()
    base = load_model(env["model"])
    before = _sft_loss(base, env["batch"])
    rt = load_adapter(base, res.final_dir)
    assert rt.method == "lora"
    after = _sft_loss(base, env["batch"])
    assert after < before - 0.5, (before, after)
    rows = [json.loads(line) for line in (env["root"] / f"run_{method}" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and "token_acc" in rows[0]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_sft_train_save_and_serve(env, method):
    res = _finetune(env, method, train={**TRAIN, "lr": 0.1}, prompt={"num_virtual_tokens": 4}, data={
        "path": str(env["sft"]), "val_fraction": 0.0, "max_len": 256, "batch_size": 4})
    base = load_model(env["model"])
    before = _sft_loss(base, env["batch"])
    rt = load_adapter(base, res.final_dir)
    assert rt.method == method and rt.num_virtual_tokens == 4
    b = env["batch"]
    pos = 4 + (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = base(b["input_ids"], position_ids=pos, ctx=PrefixContext(rt.prefix_kv, b["attention_mask"]))
    after = float(token_ce(logits, b["labels"])[0])
    # a random 2-layer model's output is near uniform (ln 320 = 5.77) whatever its input, so virtual tokens
    # can only move the loss a little; the served logits must match the training-time wrapper exactly
    assert after < before - 0.03, (before, after)
    tuned = PromptTunedModel(load_model(env["model"]), load_prompt_encoder(load_model(env["model"]), res.final_dir))
    with torch.no_grad():
        torch.testing.assert_close(logits, tuned(b["input_ids"], attention_mask=b["attention_mask"]),
                                   rtol=1e-4, atol=1e-4)
    # and the serving engine (lmstack.load(..., adapter=...)) decodes greedily what the wrapper predicts
    import lmstack

    prompt = [int(t) for t in b["input_ids"][0, :10]]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(tuned(torch.tensor([ids]))[0, -1].argmax()))
    out = lmstack.load(str(env["model"]), adapter=str(res.final_dir), device="cpu").generate(
        [prompt], temperature=0.0, max_tokens=4, ignore_eos=True, use_tqdm=False)
    assert out[0].outputs[0].token_ids == ids[10:]


def test_full_finetune_writes_a_model_directory(env):
    res = _finetune(env, "full", train={**TRAIN, "steps": 6, "lr": 3e-3})
    tuned = load_model(res.final_dir)
    assert _sft_loss(tuned, env["batch"]) < _sft_loss(load_model(env["model"]), env["batch"]) - 0.5


def test_dpo_raises_reward_margin(env):
    from lmstack.tune.dpo import align_dpo

    run = env["root"] / "run_dpo"
    cfg = validate(DPOConfig, {"model": str(env["model"]), "method": "lora", "run_dir": str(run),
                               "lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
                               "dpo": {"beta": 0.5}, "data": {"path": str(env["pairs"]), "val_fraction": 0.25},
                               "train": {**TRAIN, "lr": 5e-3}})
    res = align_dpo(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=0.05)  # policy == reference at the start: -log σ(0)
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] and rows[-1]["pref_accuracy"] == 1.0
    assert res.last_loss < 0.6
    ev = json.loads((run / "dpo_eval.json").read_text())
    assert ev["pairs"] == 2 and {"reward_margin", "pref_accuracy", "loss"} <= set(ev)


def test_distill_moves_student_towards_teacher(env):
    from lmstack.tune.distill import distill

    student = make_model_dir(env["root"] / "student", seed=3)
    (student / "tokenizer.json").write_bytes((env["model"] / "tokenizer.json").read_bytes())
    run = env["root"] / "run_distill"
    cfg = validate(DistillConfig, {"teacher": str(env["model"]), "student": str(student), "run_dir": str(run),
                                   "distill": {"alpha": 1.0, "temperature": 1.0},
                                   "data": {"path": str(env["sft"]), "val_fraction": 0.0},
                                   "train": {**TRAIN, "lr": 1e-2}})
    from lmstack.tune.losses import kd_loss

    b, teacher = env["batch"], load_model(env["model"])

    def kd(student_dir):
        with torch.no_grad():
            return float(kd_loss(forward_logits(load_model(student_dir), b), forward_logits(teacher, b),
                                 b["labels"], 1.0, 1.0)[0])

    before = kd(student)
    res = distill(cfg)
    assert kd(res.final_dir) < before * 0.5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"kd", "ce"} <= set(rows[0])


def test_cli_finetune_then_merge_has_unmerged_logits(env, tmp_path, capsys):
    run = tmp_path / "cli_run"
    rc = main(["finetune", "--model", str(env["model"]), "--data", str(env["sft"]), "--method", "lora",
               "--lora.r", "4", "--lora.target_modules", "q_proj,v_proj,down_proj", "--train.steps", "3",
               "--train.tensorboard=false", "--train.plot=false", "--run-dir", str(run)])
    assert rc == 0 and "completed: 3 steps" in capsys.readouterr().out
    rc = main(["merge", "--model", str(env["model"]), "--adapter", str(run / "final"), "--out", str(tmp_path / "m")])
    assert rc == 0
    ids = env["batch"]["input_ids"]
    base = load_model(env["model"])
    load_adapter(base, run / "final")
    merged = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_cli_errors_are_one_line(env, tmp_path, capsys):
    rc = main(["merge", "--model", str(env["model"]), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no adapter_config.json" in err and err.count("\n") == 1
    rc = main(["finetune", "--model", str(env["model"]), "--data", str(tmp_path / "missing.jsonl")])
    assert rc == 2 and "missing.jsonl: data file not found" in capsys.readouterr().err
    rc = main(["finetune", "--model", str(env["model"]), "--data", str(env["sft"]), "--lora.target_modules", "qq"])
    assert rc == 2 and "no linear layer named 'qq'" in capsys.readouterr().err


def test_lora_run_resumes_exactly(env, tmp_path):
    """Stopping after 2 steps and resuming (--resume auto) ends with the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    from lmstack.tune.sft import finetune

    def run(name, steps, resume=None):
        cfg = validate(FinetuneConfig, {
            "model": str(env["model"]), "method": "lora", "run_dir": str(tmp_path / name),
            "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
            "data": {"path": str(env["sft"]), "val_fraction": 0.0, "batch_size": 2},
            "train": {**TRAIN, "steps": steps, "ckpt_every": 2, "eval_every": 0, "resume": resume,
                      "schedule": "constant", "warmup_steps": 0}})
        return finetune(cfg)

    whole = run("whole", 4)
    run("parts", 2)
    resumed = run("parts", 4, resume="auto")
    assert resumed.steps == 4
    a = load_file(str(whole.final_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_model_mismatch_stops_before_training(env, tmp_path):
    from lmstack.errors import DataError
    from lmstack.tune.sft import finetune
    from tests.conftest import make_hf_model

    small = tmp_path / "small_vocab"
    make_hf_model("qwen2", small, vocab_size=64)  # the default tokenizer has 320 ids
    cfg = validate(FinetuneConfig, {"model": str(small), "tokenizer": str(env["model"]), "run_dir": str(tmp_path / "r"),
                                    "data": {"path": str(env["sft"])}, "train": TRAIN})
    with pytest.raises(DataError, match=r"token id \d+ >= the model's vocab_size 64"):
        finetune(cfg)
