"""fit(): against a plain transformers training loop, gradient accumulation by tokens, exact resume after
SIGKILL and SIGINT, NaN steps, checkpoint pruning, outputs (metrics, plot, final model)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmstack.train import LossOutput, TrainConfig, TrainingDiverged, causal_lm_loss, fit
from tests.train_fixtures import (
    KILL_AT, KILL_STEPS, TINY_MODEL, TINY_TOKENIZER, dist_data, dist_model, dist_train_config, kill_train_config, write_shards,
)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards") / "s")


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run) if "loss" in r]


def cfg(**kw) -> TrainConfig:
    return dist_train_config(**kw)


# --------------------------------------------------------------------------- against an independent loop
def test_fit_matches_plain_transformers_loop(shards, tmp_path):
    """Same init, data, AdamW (decay on matrices only), cosine+warmup, clipping: a hand-written loop over
    transformers' LlamaForCausalLM gives the same per-step losses."""
    import transformers

    from lmstack.model import save_model

    steps, lr, warm, floor = 4, 1e-2, 1, 1e-3
    model = dist_model()
    save_model(model, tmp_path / "init")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "init", dtype=torch.float32).train()
    decay = [p for p in hf.parameters() if p.ndim >= 2]
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    data = dist_data(shards, 0, 1, 4)
    ref = []
    for t in range(steps):  # GPT-3 style schedule, written out: linear warmup, cosine to floor at the end
        cur = lr * (t + 1) / (warm + 1) if t < warm else \
            floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * (t - warm) / (steps - 1 - warm)))
        for g in opt.param_groups:
            g["lr"] = cur
        b = next(data)
        logits = hf(b["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())

    res = fit(model, dist_data(shards, 0, 1, 4), causal_lm_loss,
              cfg(steps=steps, warmup_steps=warm, min_lr_ratio=floor / lr), tmp_path / "run")
    assert res.steps == steps and res.stopped == "completed"
    torch.testing.assert_close(losses(tmp_path / "run"), ref, atol=2e-5, rtol=0)


def test_grad_accum_is_token_weighted(tmp_path):
    """Two micro-batches with 3 and 29 target tokens == one batch holding both (mean over all 32 tokens),
    not the mean of the two micro-batch means."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 17), generator=g)
    tgt = torch.randint(3, 200, (2, 17), generator=g)
    tgt[0, 3:] = -100  # 3 tokens in row 0
    tgt[1, :-12] = -100  # 12 tokens ... (plus padding below)
    tgt[1, 5] = 7  # 13 in row 1
    micro = [{"input_ids": ids[i:i + 1], "targets": tgt[i:i + 1]} for i in range(2)]
    whole = {"input_ids": ids, "targets": tgt}

    class Cycle:
        def __init__(self, batches):
            self.b, self.i = batches, 0

        def __next__(self):
            self.i += 1
            return self.b[(self.i - 1) % len(self.b)]

    a, b = dist_model(), dist_model()
    fit(a, Cycle(micro), causal_lm_loss, cfg(steps=3, grad_accum=2), tmp_path / "a")
    fit(b, Cycle([whole]), causal_lm_loss, cfg(steps=3, grad_accum=1), tmp_path / "b")
    # float32 summation order differs (two backward passes vs one) and AdamW's 1/sqrt(v) amplifies it:
    # seen ~2e-6 on losses, ~5e-5 on weights. Averaging the two micro-batch means instead (3 tokens weighted
    # like 13) misses by 0.23 on the step-3 loss and 3e-2 on weights.
    torch.testing.assert_close(losses(tmp_path / "a"), losses(tmp_path / "b"), atol=1e-5, rtol=0)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-4, rtol=0, msg=k)


# --------------------------------------------------------------------------- resume
def test_sigkill_then_resume_gives_the_same_losses(shards, tmp_path):
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_fixtures.py"), "kill", str(run), str(shards)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003"]
    assert max(r["step"] for r in records(run)) == KILL_AT - 1 == 4  # step 4 was logged after the checkpoint

    res = fit(dist_model(), dist_data(shards, 0, 1, 4), causal_lm_loss, kill_train_config(resume="auto"), run)
    assert res.steps == KILL_STEPS
    fit(dist_model(), dist_data(shards, 0, 1, 4), causal_lm_loss, kill_train_config(), tmp_path / "straight")
    assert [r["step"] for r in records(run)] == list(range(1, KILL_STEPS + 1))
    torch.testing.assert_close(losses(run), losses(tmp_path / "straight"), atol=1e-6, rtol=0)
    from lmstack.model import read_state_dict

    a, b = read_state_dict(run / "final"), read_state_dict(tmp_path / "straight" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_sigint_saves_a_checkpoint_and_resumes(shards, tmp_path):
    calls = {"n": 0}
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when run as a shell background job

    def interrupting(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C during step 3
        return causal_lm_loss(model, batch)

    run = tmp_path / "run"
    res = fit(dist_model(), dist_data(shards, 0, 1, 4), interrupting, cfg(steps=5, ckpt_every=0), run)
    assert res.stopped == "interrupted" and res.steps == 3 and res.final_dir is None
    assert res.checkpoint_dir == run / "checkpoints" / "step_000003"
    assert (res.checkpoint_dir / "trainer_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored
    fit(dist_model(), dist_data(shards, 0, 1, 4), causal_lm_loss, cfg(steps=5, resume="auto"), run)
    fit(dist_model(), dist_data(shards, 0, 1, 4), causal_lm_loss, cfg(steps=5), tmp_path / "straight")
    torch.testing.assert_close(losses(run), losses(tmp_path / "straight"), atol=1e-6, rtol=0)


def test_keep_last_prunes_and_leaves_no_temporaries(shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step_000007.tmp").mkdir(parents=True)  # as left by a run killed mid-save
    fit(dist_model(), dist_data(shards, 0, 1, 2), causal_lm_loss, cfg(steps=4, ckpt_every=1, keep_last=2), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    ck = run / "checkpoints" / "step_000004"
    ts = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert ts["step"] == 4 and ts["data"]["cursor"] == 8 and ts["optimizer"]["state"]
    assert (ck / "config.yaml").is_file() and (ck / "config.json").is_file()


def test_resume_path_errors(tmp_path):
    from lmstack.errors import CheckpointError
    from lmstack.train.checkpoint import find_resume

    assert find_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(CheckpointError, match="no trainer_state.pt"):
        find_resume(str(tmp_path / "nope"), tmp_path)


# --------------------------------------------------------------------------- NaN / inf
class NaNAt:
    def __init__(self, bad_calls):
        self.bad, self.n = bad_calls, 0

    def __call__(self, model, batch) -> LossOutput:
        self.n += 1
        out = causal_lm_loss(model, batch)
        if self.n in self.bad:
            out = LossOutput(out.loss * float("nan"), out.num_tokens, {})
        return out


def test_nan_step_is_skipped_and_counted(shards, tmp_path):
    model = dist_model()
    res = fit(model, dist_data(shards, 0, 1, 2), NaNAt({2}), cfg(steps=4), tmp_path / "run")
    assert res.bad_steps == 1 and res.stopped == "completed" and math.isfinite(res.last_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    recs = [r for r in records(tmp_path / "run") if "loss" in r]
    assert math.isnan(recs[1]["loss"]) and recs[-1]["bad_steps"] == 1


def test_k_bad_steps_in_a_row_stop_and_keep_the_good_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row.*step_000002"):
        fit(dist_model(), dist_data(shards, 0, 1, 2), NaNAt(set(range(3, 100))),
            cfg(steps=10, ckpt_every=2, max_bad_steps=3), run)
    ck = run / "checkpoints" / "step_000002"
    from lmstack.model import read_state_dict

    assert all(torch.isfinite(t).all() for t in read_state_dict(ck).values())


# --------------------------------------------------------------------------- outputs
def test_outputs_metrics_plot_and_final_model(shards, tmp_path):
    import transformers

    from lmstack.data.shards import open_split
    from lmstack.train.data import eval_batches

    val_arrays = open_split(shards, "val")

    def val():
        return eval_batches(val_arrays, 32, 4)

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes(TINY_TOKENIZER)
    model = dist_model()
    run = tmp_path / "run"
    res = fit(model, dist_data(shards, 0, 1, 4), causal_lm_loss,
              cfg(steps=4, eval_every=2, plot=True, eval_batches=100, save_final=True), run, val_data=val, tokenizer_dir=tok)
    recs = records(run)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 and r["lr"] > 0
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert vals[-1]["val_ppl"] == pytest.approx(math.exp(vals[-1]["val_loss"]))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file()
    # the final directory loads in transformers; its val loss is the logged one
    assert (res.final_dir / "tokenizer.json").read_bytes() == TINY_TOKENIZER
    hf = transformers.AutoModelForCausalLM.from_pretrained(res.final_dir, dtype=torch.float32).eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in val():
            logits = hf(b["input_ids"]).logits
            tot += F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="sum").item()
            n += b["targets"].numel()
    assert vals[-1]["val_loss"] == pytest.approx(tot / n, abs=1e-4)
    assert res.best_val_loss == pytest.approx(min(v["val_loss"] for v in vals))


def test_custom_writer_and_frozen_params_resume(shards, tmp_path):
    """A LoRA-like use: only some parameters train, a custom writer saves them; resume restores them."""
    written = []

    def writer(model, out_dir):
        written.append(Path(out_dir).name)
        torch.save({"norm": model.model.norm.weight.detach().clone()}, Path(out_dir) / "adapter.pt")

    def make():
        m = dist_model()
        for p in m.parameters():
            p.requires_grad_(False)
        m.model.norm.weight.requires_grad_(True)
        return m

    run = tmp_path / "run"
    m1 = make()
    before = m1.model.layers[0].mlp.up_proj.weight.clone()
    fit(m1, dist_data(shards, 0, 1, 2), causal_lm_loss, cfg(steps=4, ckpt_every=2, lr=0.1, save_final=True), run,
        save_model_fn=writer)
    assert torch.equal(m1.model.layers[0].mlp.up_proj.weight, before)  # frozen stays frozen
    assert not torch.equal(m1.model.norm.weight, torch.ones_like(m1.model.norm.weight))
    assert (run / "final" / "adapter.pt").is_file() and not (run / "final" / "model.safetensors").exists()
    # resume from step 2 with a fresh model: continues exactly
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000004")
    m2 = make()
    fit(m2, dist_data(shards, 0, 1, 2), causal_lm_loss, cfg(steps=4, ckpt_every=2, lr=0.1, resume="auto"), run,
        save_model_fn=writer)
    torch.testing.assert_close(m2.model.norm.weight, m1.model.norm.weight, atol=1e-6, rtol=0)


def test_activation_checkpointing_same_losses_same_names(shards, tmp_path):
    a = dist_model()
    names = [n for n, _ in a.named_parameters()]
    fit(a, dist_data(shards, 0, 1, 2), causal_lm_loss, cfg(steps=2, activation_checkpointing=True), tmp_path / "ac")
    fit(dist_model(), dist_data(shards, 0, 1, 2), causal_lm_loss, cfg(steps=2), tmp_path / "plain")
    assert [n for n, _ in a.named_parameters()] == names
    torch.testing.assert_close(losses(tmp_path / "ac"), losses(tmp_path / "plain"), atol=1e-6, rtol=0)


def test_flops_per_token_palm_formula():
    from lmstack.model import build_model, preset
    from lmstack.train.flops import flops_per_token

    m = build_model(preset("tiny", **TINY_MODEL), device="cpu")
    # by hand for h=64, i=128, L=2, 4 heads x 16, 2 kv heads, V=256, T=32:
    # per layer q 4096 + k,v 4096 + o 4096 + mlp 24576 + norms 128 = 36992; x2 + final norm 64 = 74048;
    # + lm_head 16384 = 90432 -> 6N = 542592; attention 12*L*H*Q*T = 12*2*4*16*32 = 49152
    assert flops_per_token(m, 32) == 542592 + 49152


def test_sigterm_sets_the_same_stop_flag_and_handlers_are_restored():
    from lmstack.train.loop import _StopFlag

    before = signal.getsignal(signal.SIGTERM)
    flag = _StopFlag()
    with flag.installed():
        signal.raise_signal(signal.SIGTERM)  # a cluster preemption / torchrun shutdown
        assert flag.is_set
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
