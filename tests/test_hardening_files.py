"""Untrusted files never run code: a crafted trainer state, chat template or adapter config that would run a
command (touch a marker file) when loaded the unsafe way is refused with one line, and the marker never
appears. Each test first shows the crafted file is real: the unsafe loader does run it."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.errors import CheckpointError, LmstackError
from lmstack.train import causal_lm_loss, fit
from tests.train_fixtures import dist_data, dist_model, dist_train_config, write_shards


class _Touch:
    """Unpickling this runs ``touch MARKER`` (what an attacker's file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


# --------------------------------------------------------------------------- trainer state (torch.load)
def test_crafted_trainer_state_does_not_run_on_resume(tmp_path):
    shards = write_shards(tmp_path / "shards")
    run = tmp_path / "run"
    fit(dist_model(), dist_data(shards, 0, 1, 2), causal_lm_loss, dist_train_config(steps=2, ckpt_every=2), run)
    state = run / "checkpoints" / "step_000002" / "trainer_state.pt"
    good = torch.load(state, weights_only=True)  # the real state loads with the safe loader
    assert good["step"] == 2

    marker = tmp_path / "pwned"
    evil = dict(good, optimizer=_Touch(marker))  # right format tag, a payload inside
    torch.save(evil, state)
    # control: the file really runs a command when unpickled in full
    torch.load(state, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"trainer_state.pt: cannot read it as an lmstack trainer state"):
        fit(dist_model(), dist_data(shards, 0, 1, 2), causal_lm_loss,
            dist_train_config(steps=3, ckpt_every=2, resume="auto"), run)
    assert not marker.exists()


def test_plain_pickle_named_trainer_state_is_refused(tmp_path):
    from lmstack.train.checkpoint import read_trainer_state

    marker = tmp_path / "pwned"
    (tmp_path / "trainer_state.pt").write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(CheckpointError) as e:
        read_trainer_state(tmp_path)
    assert not marker.exists() and "\n" not in str(e.value)


# --------------------------------------------------------------------------- chat templates (jinja)
SSTI = ("{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}")


def test_chat_template_from_a_model_dir_cannot_run_commands(tmp_path):
    import jinja2

    from lmstack.tokenizer import Tokenizer
    from tests.tokenizer_fixtures import corpus, write_qwen2_dir

    marker = tmp_path / "pwned"
    template = SSTI.replace("MARKER", str(marker))
    # control: an ordinary jinja2 Environment runs the payload
    jinja2.Environment().from_string(template).render(messages=[{"role": "user", "content": "hi"}])
    assert marker.exists()
    marker.unlink()

    d = write_qwen2_dir(tmp_path / "tok", corpus(20), template=template)
    tok = Tokenizer.from_dir(d)
    with pytest.raises(LmstackError) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "chat template" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- YAML configs and recipes
def test_yaml_config_with_python_tags_does_not_run(tmp_path):
    import yaml

    from lmstack.config import read_yaml
    from lmstack.errors import ConfigError

    marker = tmp_path / "pwned"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f'name: x\nstages: !!python/object/apply:os.system ["touch {marker}"]\n')
    yaml.unsafe_load(cfg.read_text())  # control: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        read_yaml(cfg)
    assert not marker.exists() and "\n" not in str(e.value)


# --------------------------------------------------------------------------- sizes
def test_oversized_json_files_are_refused_before_reading(tmp_path):
    from lmstack.tokenizer import Tokenizer
    from lmstack.tune.adapters import load_adapter
    from lmstack.utils.io import MAX_JSON_BYTES

    def sparse(p: Path, size: int) -> Path:  # no disk used: the size alone must stop the read
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(size)
        return p

    sparse(tmp_path / "tok" / "tokenizer.json", MAX_JSON_BYTES + 1)
    with pytest.raises(LmstackError, match="over the .*-byte limit"):
        Tokenizer.from_dir(tmp_path / "tok")
    sparse(tmp_path / "ad" / "adapter_config.json", 10 << 30)
    with pytest.raises(CheckpointError, match="over the .*-byte limit"):
        load_adapter(None, tmp_path / "ad")  # refused before the model is looked at
