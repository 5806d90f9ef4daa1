"""Packed windows over token shards; pretrain() end to end; bad input stops before training with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmstack.errors import ConfigError, DataError
from lmstack.train import PretrainConfig, pretrain
from lmstack.train.data import PackedBatches, eval_batches
from tests.train_fixtures import TINY_MODEL, TINY_TOKENIZER, tiny_tokenizer_json, write_shards

torch.set_num_threads(2)


def arrays(lengths=(50, 33)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1000, n).astype(np.uint16) for n in lengths]


def all_windows(arrs, T):
    """Reference: every (T+1)-token slice starting at a multiple of T, per file."""
    out = []
    for a in arrs:
        for s in range(0, len(a) - T, T):
            out.append(tuple(int(x) for x in a[s:s + T + 1]))
    return out


def rows(batch):
    full = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1)  # (B, T + 1)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])  # targets are inputs shifted by 1
    return [tuple(r.tolist()) for r in full]


def test_one_epoch_is_a_permutation_of_all_windows():
    arrs, T = arrays(), 8
    ref = all_windows(arrs, T)  # 6 + 4 = 10 windows
    src = PackedBatches(arrs, T, 2, seed=3)
    assert len(src) == len(ref) == 10
    seen = [r for _ in range(5) for r in rows(next(src))]
    assert sorted(seen) == sorted(ref) and seen != ref  # all, once, shuffled
    second = [r for _ in range(5) for r in rows(next(src))]
    assert sorted(second) == sorted(ref) and second != seen  # a new order each epoch
    other = PackedBatches(arrs, T, 2, seed=4)
    assert [r for _ in range(5) for r in rows(next(other))] != seen


def test_two_ranks_together_see_what_one_process_sees():
    arrs, T = arrays(), 8
    one = PackedBatches(arrs, T, 4, seed=0)
    r0 = PackedBatches(arrs, T, 2, seed=0, rank=0, world_size=2)
    r1 = PackedBatches(arrs, T, 2, seed=0, rank=1, world_size=2)
    for _ in range(7):  # crosses epoch boundaries (10 windows, 4 per step)
        assert rows(next(one)) == rows(next(r0)) + rows(next(r1))


def test_state_dict_resumes_exactly_and_checks_shape():
    from lmstack.errors import CheckpointError

    arrs, T = arrays(), 8
    a = PackedBatches(arrs, T, 3, seed=1)
    for _ in range(4):
        next(a)
    b = PackedBatches(arrs, T, 3, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # survives serialisation
    for _ in range(5):
        assert rows(next(a)) == rows(next(b))
    with pytest.raises(CheckpointError, match="seq_len"):
        PackedBatches(arrs, 4, 3, seed=1).load_state_dict(a.state_dict())


def test_eval_batches_in_order_and_split_over_ranks():
    arrs, T = arrays(), 8
    ref = all_windows(arrs, T)
    assert [r for b in eval_batches(arrs, T, 3) for r in rows(b)] == ref[:9]
    r0 = [r for b in eval_batches(arrs, T, 2, rank=0, world_size=2) for r in rows(b)]
    r1 = [r for b in eval_batches(arrs, T, 2, rank=1, world_size=2) for r in rows(b)]
    assert r0 == ref[0:2] + ref[4:6] and r1 == ref[2:4] + ref[6:8]


# --------------------------------------------------------------------------- pretrain()
def pcfg(shards: Path, run: Path, **sections) -> PretrainConfig:
    d = {"run_dir": str(run), "model": {"preset": "tiny", "overrides": dict(TINY_MODEL)},
         "data": {"shards": str(shards), "seq_len": 32, "batch_size": 4},
         "train": {"steps": 6, "warmup_steps": 1, "lr": 1e-2, "log_every": 1, "eval_every": 3, "ckpt_every": 3,
                   "peak_flops": 1e11, "tensorboard": False, "plot": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return PretrainConfig.model_validate(d)


def test_pretrain_from_preset_end_to_end(tmp_path):
    import transformers

    shards = write_shards(tmp_path / "shards", train_tokens=6000)
    res = pretrain(pcfg(shards, tmp_path / "run", train={"plot": True}))
    assert (tmp_path / "run" / "loss.png").is_file()
    assert res.stopped == "completed" and res.steps == 6 and res.best_val_loss is not None
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tl = [r["loss"] for r in recs if "loss" in r]
    assert tl[-1] < tl[0] - 0.5  # it learns the counting pattern
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["seq_len"] == 32 and saved["train"]["lr"] == 1e-2
    final = res.final_dir
    assert (final / "tokenizer.json").read_bytes() == TINY_TOKENIZER  # from the shards' tokenizer_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert hf.config.vocab_size == 256 and hf.config.eos_token_id == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_continued_pretraining_from_hf_dir(tmp_path):
    from tests.conftest import make_hf_model

    tok = tiny_tokenizer_json("same")
    shards = write_shards(tmp_path / "shards", tokenizer_json=tok)
    make_hf_model("qwen2", tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_bytes(tok)
    res = pretrain(pcfg(shards, tmp_path / "run", model={"from_dir": str(tmp_path / "base")},
                        train={"steps": 2, "eval_every": 0, "ckpt_every": 0}))
    cfg = json.loads((res.final_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and (res.final_dir / "tokenizer.json").read_bytes() == tok


# --------------------------------------------------------------------------- bad input, before training
def assert_nothing_ran(run: Path):
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_empty_shards(tmp_path):
    shards = write_shards(tmp_path / "s", train_tokens=0, n_files=1)
    with pytest.raises(DataError, match="train split has no tokens"):
        pretrain(pcfg(shards, tmp_path / "run"))
    assert_nothing_ran(tmp_path / "run")


def test_tokenizer_hash_mismatch(tmp_path):
    from tests.conftest import make_hf_model

    shards = write_shards(tmp_path / "s", tokenizer_json=b'{"a": 1}')
    make_hf_model("llama", tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_bytes(b'{"b": 2}')
    with pytest.raises(DataError, match=r"tokenizer_sha256 .* differs from .*tokenizer.json"):
        pretrain(pcfg(shards, tmp_path / "run", model={"from_dir": str(tmp_path / "base")}))
    assert_nothing_ran(tmp_path / "run")


def test_seq_len_beyond_positions(tmp_path):
    shards = write_shards(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds .*max_position_embeddings \(128\)"):
        pretrain(pcfg(shards, tmp_path / "run", data={"seq_len": 512}))


def test_batch_that_cannot_fit(tmp_path):
    shards = write_shards(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"needs about .* GiB .* free; lower data.batch_size"):
        pretrain(pcfg(shards, tmp_path / "run", data={"batch_size": 10_000_000}))
    assert_nothing_ran(tmp_path / "run")


def test_too_few_windows_and_vocab_mismatch(tmp_path):
    shards = write_shards(tmp_path / "s", train_tokens=100, n_files=1)
    with pytest.raises(DataError, match=r"has \d+ windows .* one step needs 4"):
        pretrain(pcfg(shards, tmp_path / "run"))
    big = write_shards(tmp_path / "v", vocab=1000)
    with pytest.raises(DataError, match="vocab_size 1000 > the model's vocab_size 256"):
        pretrain(pcfg(big, tmp_path / "run", model={"overrides": {**TINY_MODEL, "vocab_size": 256}}))


def test_cli_one_line_error_and_overrides(tmp_path, capsys):
    from lmstack.cli import main

    shards = write_shards(tmp_path / "s")
    recipe = tmp_path / "r.yaml"
    c = pcfg(shards, tmp_path / "run")
    recipe.write_text(yaml.safe_dump(c.model_dump(mode="json")))
    assert main(["pretrain", "--config", str(recipe), "--data.seq_len=4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: data.seq_len=4096 exceeds") and "\n" not in err
    assert main(["pretrain", "--config", str(recipe), "--train.schedule=bogus"]) == 2
    assert "train.schedule" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(recipe), "--train.steps=2", "--train.eval_every=0"]) == 0
    assert "completed: 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("recipes/pretrain-*.yaml")))
def test_shipped_pretrain_recipes_load(path):
    from lmstack.train.config import load_pretrain_config

    c = load_pretrain_config(str(path), ["train.lr=0.002", "data.shards=elsewhere"])
    assert c.train.lr == 0.002 and c.data.shards == "elsewhere" and c.run_dir.startswith("runs/")


def test_recipe_form_config(tmp_path):
    from lmstack.train.config import load_pretrain_config

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "demo", "stages": [], "seed": 7,
                                 "pretrain": {"model": {"preset": "small"}, "data": {"shards": "s"},
                                              "train": {"steps": 5, "warmup_steps": 1}}}))
    c = load_pretrain_config(str(p), ["train.steps=9"])
    # a recipe's stage runs in runs/NAME/STAGE (the one config rule of 40463ae)
    assert (c.run_dir, c.model.preset, c.train.seed, c.train.steps) == ("runs/demo/pretrain", "small", 7, 9)
    with pytest.raises(ConfigError, match=r"data.shards"):
        load_pretrain_config(str(p), ["data.shards=null"])
