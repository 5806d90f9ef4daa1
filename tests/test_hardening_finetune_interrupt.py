"""``lmstack finetune`` interrupted (issue 18): SIGINT / SIGTERM exit 130 / 143 with one line naming the checkpoint
kept and how to continue (the issue found 0 for ``data run``, ``pretrain`` and ``finetune``; the first two are
tested in tests/test_hardening_cli.py), and the run does continue from it."""

from __future__ import annotations

import signal

import pytest

from lmstack.cli import main
from tests.tune_fixtures import SFT_ROWS, make_model_dir, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_interrupt")
    return {"model": make_model_dir(root / "model"), "sft": write_jsonl(root / "sft.jsonl", SFT_ROWS * 2)}


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_finetune_interrupt_exits_128_plus_signal_naming_the_checkpoint(env, sig, code, tmp_path, monkeypatch,
                                                                         capsys):
    import lmstack.tune.sft as S
    from tests.train_fixtures import interrupt_loss_at

    real = interrupt_loss_at(monkeypatch, S, "sft_loss", sig)  # as `kill -TERM` / Ctrl-C during step 2
    run = tmp_path / "run"
    args = ["finetune", "--model", str(env["model"]), "--data", str(env["sft"]), "--method", "lora",
            "--run-dir", str(run), "--lora.r", "2", "--train.steps", "4", "--train.ckpt_every", "0",
            "--train.eval_every", "0", "--train.tensorboard", "false", "--train.plot", "false",
            "--data.val_fraction", "0"]
    before = signal.getsignal(signal.SIGTERM)
    assert main(args) == code
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lmstack")]  # (the data report aside)
    ck = run / "checkpoints" / "step_000002"
    assert len(err) == 1 and signal.Signals(sig).name in err[0] and "Traceback" not in err[0], err
    assert "after step 2" in err[0] and str(ck) in err[0] and "--resume auto" in err[0], err
    assert (ck / "trainer_state.pt").is_file() and signal.getsignal(signal.SIGTERM) is before
    if sig == signal.SIGTERM:  # and it continues from there
        monkeypatch.setattr(S, "sft_loss", real)
        assert main(args + ["--resume", "auto"]) == 0
        assert (run / "final" / "adapter_model.safetensors").is_file()
