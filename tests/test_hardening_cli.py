"""User mistakes get one line and exit 2 from every verb; SIGINT / SIGTERM exit 130 / 143 with one line saying
what was kept; ``--debug`` still shows the traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LMSTACK_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_bad")
    (d / "t.txt").write_text("hello world\n")
    (d / "bin.yaml").write_bytes(bytes(range(256)) * 8)
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (d / "empty").mkdir()
    return d


def _cases(d: Path) -> list[tuple[list[str], str]]:
    """(argv, a phrase the one line must contain) -- at least one bad call per verb."""
    t, o = str(d / "t.txt"), str(d / "out")
    return [
        (["nosuchcmd"], "No such command"),
        (["generate", "--max-tokens", "5"], "No such option: --max-tokens"),
        (["generate", "-m", "/nonexistent", "-p", "hi"], "model directory not found"),
        (["info", "/nonexistent"], "config.json not found"),
        (["info", t], "invalid JSON"),
        (["chat", "-m", "/nonexistent"], "not found"),
        (["pretrain"], "data"),
        (["pretrain", "-c", str(d / "bin.yaml")], "binary file, not YAML"),
        (["pretrain", "-c", str(d / "latin1.yaml")], "not YAML text"),
        (["pretrain", "--train.lr=abc"], "train.lr"),
        (["finetune"], "model"),
        (["distill"], "teacher"),
        (["align", "dpo"], "model"),
        (["merge", "--model", "/nonexistent", "--adapter", str(d), "--out", o], "adapter_config.json"),
        (["serve", "-m", "/nonexistent"], "not found"),
        (["serve", "-m", "/nonexistent", "--port", "70000"], "Input should be less than or equal to 65535"),
        (["support", "serve", "--model", "/m", "--index", "/i", "--port", "0"], "Input should be greater than or equal to 1"),
        (["support", "chat", "/nonexistent"], "not an app bundle"),
        (["run", "/nonexistent.yaml"], "not found"),
        (["run", str(d / "bin.yaml")], "binary file"),
        (["tokenizer", "train", "-i", t, "-o", o, "--vocab-size", "1000000000"], "vocab_size 1000000000 is too large"),
        (["tokenizer", "train", "-i", "/nonexistent", "-o", o], "does not exist"),
        (["tokenizer", "train", "-i", t, "-o", f"{t}/sub"], "Not a directory"),
        (["tokenizer", "stats", "/nonexistent", "-i", t], "does not exist"),
        (["tokenizer", "encode", "/nonexistent", "hi"], "does not exist"),
        (["tokenizer", "decode", "/nonexistent", "1,2"], "ids"),
        (["tokenizer", "chat", "/nonexistent", "[]"], "does not exist"),
        (["data", "run"], "Missing option '--config'"),
        (["data", "run", "-c", str(d / "bin.yaml")], "binary file"),
        (["data", "clean", "/nonexistent", "-o", o], "does not exist"),
        (["data", "clean", t, "-o", f"{t}/sub"], "Not a directory"),
        (["data", "clean", t, "-o", o, "--workers", "-3"], "workers"),
        (["data", "clean", t, "-o", o, "--pii", "bogus"], "pii.action"),
        (["data", "dedup", "/nonexistent", "-o", o], "does not exist"),
        (["data", "stats", "/nonexistent"], "does not exist"),
        (["data", "tokenize", t, "-t", "/nonexistent", "-o", o], "no tokenizer.json"),
        (["data", "merge", "-o", str(d / "empty")], "no shard outputs"),
        (["eval", "compare", "/x", "/y"], "no results.json"),
        (["eval", "export-lm-eval", "nosuchtask", o], "unknown task"),
        (["support", "chat"], "bundle"),
    ]


def test_every_verb_answers_bad_arguments_with_one_line(files, capsys):
    failures = []
    for argv, phrase in _cases(files):
        rc = main(argv)
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        if rc != 2 or len(err) != 1 or not err[0].startswith("lmstack") or phrase not in err[0]:
            failures.append((argv, rc, err[-3:]))
    assert not failures, "\n".join(map(str, failures))


def test_real_entry_point_exit_status_and_debug(files):
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--max-tokens", "5"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "--debug", "info", "/nonexistent"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


# --------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_pretrain_interrupt_exits_128_plus_signal_naming_the_checkpoint(sig, code, tmp_path, monkeypatch, capsys):
    import lmstack.train.pretraining as P
    from tests.train_fixtures import TINY_MODEL, interrupt_loss_at, write_shards

    shards = write_shards(tmp_path / "shards")
    real = interrupt_loss_at(monkeypatch, P, "causal_lm_loss", sig)  # as `kill -TERM` / Ctrl-C during step 2
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "x", "stages": [], "pretrain": {
        "run_dir": str(run), "model": {"preset": "tiny", "overrides": TINY_MODEL},
        "data": {"shards": str(shards), "seq_len": 16, "batch_size": 2},
        "train": {"steps": 4, "warmup_steps": 0, "ckpt_every": 0, "eval_every": 0, "device": "cpu",
                  "peak_flops": 1e11, "save_final": False, "tensorboard": False, "plot": False}}}))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["pretrain", "-c", str(recipe)]) == code
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    ck = run / "checkpoints" / "step_000002"
    assert err == [f"lmstack: pretraining interrupted by {signal.Signals(sig).name} after step 2; checkpoint {ck} "
                   "kept; continue with --resume auto"]
    assert (ck / "trainer_state.pt").is_file() and signal.getsignal(signal.SIGTERM) is before

    if sig == signal.SIGTERM:  # and it does continue (once is enough)
        monkeypatch.setattr(P, "causal_lm_loss", real)
        assert main(["pretrain", "-c", str(recipe), "--resume", "auto"]) == 0
        assert "completed: 4 steps" in capsys.readouterr().out


_DATA_RUN = r"""
import os, signal, sys
import lmstack.data.pipeline as P
from lmstack.cli import main
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell background job starts with SIGINT ignored
real = P._batched
def batched(it, size):
    for k, b in enumerate(real(it, size)):
        if k == 3:
            signal.raise_signal(getattr(signal, sys.argv[3]))  # with batches in flight in the worker pool
        yield b
P._batched = batched
sys.exit(main(["data", "run", "-c", sys.argv[1], "-o", sys.argv[2]]))
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_data_run_with_workers_stops_on_interrupt(sig, code, tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(200)) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"inputs": [{"path": str(src)}], "workers": 2, "batch_size": 5,
                               "language": {"enabled": False}, "quality": {"enabled": False}}))
    r = subprocess.run([sys.executable, "-c", _DATA_RUN, str(cfg), str(tmp_path / "out"), sig], env=ENV,
                       capture_output=True, text=True, timeout=180)  # a hang fails here instead of blocking
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == code, r.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(f"lmstack: interrupted by {sig}; outputs are written atomically")
    assert not (tmp_path / "out" / "data.jsonl").exists()


def test_serve_flags_reach_the_server(monkeypatch):
    """Several tenants' keys, the prompt-size cap and sanitizing are command-line settings of `lmstack serve`."""
    import lmstack.serve.api as api
    from lmstack.cli import main

    seen = {}
    monkeypatch.setattr(api, "run_server", lambda model, **kw: seen.update(model=model, **kw))
    assert main(["serve", "-m", "m", "--api-key", "a", "--api-key", "b", "--max-prompt-bytes", "1000",
                 "--no-sanitize"]) == 0
    assert (seen["model"], seen["api_key"], seen["max_prompt_bytes"], seen["sanitize"]) == ("m", ["a", "b"], 1000, False)
    monkeypatch.setenv("LMSTACK_API_KEY", "k1 k2")
    assert main(["serve", "-m", "m"]) == 0
    assert seen["api_key"] == ["k1", "k2"] and seen["sanitize"] is True and seen["max_prompt_bytes"] is None
