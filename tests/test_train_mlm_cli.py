"""`lmstack pretrain` with ``model.arch: encoder``: masked-LM pretraining of a BERT-style encoder on the same token
shards as the decoder, from the command line; final/ loads in transformers.BertForMaskedLM."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_fixtures import write_shards


def mask_tokenizer_json() -> bytes:
    """WordLevel over the shards' ids: "t3".."t52", EOS "</s>" = 2, and "[MASK]" = 255 as a special token."""
    from tokenizers import AddedToken, Tokenizer, models

    vocab = {"<unk>": 0, "hello": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 53)}, "[MASK]": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken("[MASK]", special=True), AddedToken("</s>", special=True)])
    return tok.to_str().encode()


def run_cli(*args: str) -> tuple[int, str]:
    """`lmstack ARGS` in this process through the CLI's entry point (its error contract included):
    (exit status, stdout + stderr)."""
    import contextlib
    import io

    from lmstack.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            rc = main(list(args))
    finally:
        torch.set_num_threads(threads)
    return rc, buf.getvalue()


def test_pretrain_encoder_mlm_from_cli(tmp_path):
    import transformers

    from lmstack.model.encoder import load_encoder

    shards = write_shards(tmp_path / "s", train_tokens=6000, tokenizer_json=mask_tokenizer_json())
    cfg = tmp_path / "mlm.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        "model: {arch: encoder, preset: bert-tiny, overrides: {hidden_size: 32, intermediate_size: 64,"
        " hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}\n"
        f"data: {{shards: {shards}, seq_len: 32, batch_size: 8}}\n"
        "train: {steps: 30, lr: 3.0e-3, warmup_steps: 2, log_every: 5, eval_every: 0, ckpt_every: 0,"
        " device: cpu, tensorboard: false, plot: false, peak_flops: 1.0e11}\n")
    rc, out = run_cli("pretrain", "--config", str(cfg))
    assert rc == 0, out
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "loss" in x]
    assert losses[0] > 3.5 and losses[-1] < losses[0] - 0.5  # from ~ln(256) down: it learns the counting pattern
    final = tmp_path / "run" / "final"
    conf = json.loads((final / "config.json").read_text())
    assert conf["architectures"] == ["BertForMaskedLM"] and conf["hidden_size"] == 32 and conf["vocab_size"] == 256
    assert (final / "tokenizer.json").is_file()
    hf = transformers.BertForMaskedLM.from_pretrained(final).eval()
    ids = torch.tensor([[5, 6, 7, 255, 9, 10, 2, 30, 31]])
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(final)(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_pretrain_encoder_resume_masks_like_an_uninterrupted_run(tmp_path):
    """The masking generator is checkpointed with the data position: 2 steps + resume to 4 give the losses of 4."""
    shards = write_shards(tmp_path / "s", tokenizer_json=mask_tokenizer_json())

    def config(name: str, steps: int) -> str:
        cfg = tmp_path / f"{name}-{steps}.yaml"
        cfg.write_text(
            f"run_dir: {tmp_path / name}\n"
            "model: {arch: encoder, overrides: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1}}\n"
            f"data: {{shards: {shards}, seq_len: 32, batch_size: 4}}\n"
            f"train: {{steps: {steps}, lr: 3.0e-3, schedule: constant, warmup_steps: 0, log_every: 1, eval_every: 0,"
            " ckpt_every: 2, device: cpu, tensorboard: false, plot: false, peak_flops: 1.0e11}\n")
        return str(cfg)

    assert run_cli("pretrain", "--config", config("full", 4))[0] == 0
    assert run_cli("pretrain", "--config", config("split", 2))[0] == 0
    rc, out = run_cli("pretrain", "--config", config("split", 4), "--resume", "auto")
    assert rc == 0, out

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("full")) == 4
    assert losses("split") == losses("full")  # exact: same data, same masks, same dropout RNG


@pytest.mark.parametrize("bad, msg", [
    ("model: {arch: encoder, preset: bert-huge}", "unknown encoder preset 'bert-huge'"),
    ("model: {arch: encoder, overrides: {rope_theta: 1.0}}", "unknown encoder field(s) rope_theta"),
    ("model: {arch: encoder, mask_token: '<m>'}", "no mask token (<m>)"),
])
def test_pretrain_encoder_refusals(tmp_path, bad, msg):
    shards = write_shards(tmp_path / "s", tokenizer_json=mask_tokenizer_json())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\n{bad}\ndata: {{shards: {shards}, seq_len: 32, batch_size: 2}}\n"
                   "train: {steps: 2, warmup_steps: 0, device: cpu}\n")
    rc, out = run_cli("pretrain", "--config", str(cfg))
    assert rc == 2 and out.startswith("lmstack: ") and msg in out and "Traceback" not in out, out
