"""Real-checkpoint recipes (model: PATH -> LoRA SFT -> eval) on tiny random models of the same architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_hf_model

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.shop.dialogues=4",
    "finetune.lora.r=4", "finetune.data.max_len=96", "finetune.data.batch_size=2",
    "finetune.train.steps=2", "finetune.train.warmup_steps=1", "finetune.train.eval_every=0",
    "finetune.train.ckpt_every=0", "eval.heldout_limit=2", "eval.max_tokens=4",
]


def _checkpoint_with_tokenizer(arch: str, path: Path) -> Path:
    """A 2-layer random `arch` model plus a small lmstack BPE tokenizer (ChatML template) in one directory."""
    from lmstack.apps.support import kb_documents, load_kb
    from lmstack.tokenizer import train_tokenizer

    make_hf_model(arch, path, vocab_size=320, max_position_embeddings=512)
    texts = [d["text"] for d in kb_documents(load_kb())]
    tok = train_tokenizer(texts, vocab_size=320, out_dir=path, show_progress=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("recipe,arch", [("qwen2.5-0.5b-lora", "qwen2"), ("qwen3-0.6b-lora", "qwen3"),
                                         ("llama-3.2-1b-lora", "llama")])
def test_real_checkpoint_recipe_lora(recipe, arch, tmp_path):
    from lmstack.pipeline import load_recipe, run_recipe
    from lmstack.apps.support.report import next_commands

    model = _checkpoint_with_tokenizer(arch, tmp_path / "model")
    overrides = TINY + [f"model={model}", f"run_dir={tmp_path / 'run'}"]
    res = run_recipe(load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides), show_progress=False)
    assert [s.name for s in res.stages] == ["data", "finetune", "eval"]
    final = tmp_path / "run" / "finetune" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert Path(adapter["base_model_name_or_path"]).resolve() == model.resolve()
    ev = res.summary("eval")
    assert set(ev) >= {"base", "finetuned"}
    assert ev["finetuned"]["support_heldout"].keys() >= {"rougeL", "exact_match"}
    ft = json.loads((tmp_path / "run/eval/finetuned/results.json").read_text())
    assert ft["adapter"]["path"] == str(final.resolve())
    assert f"--model {model} --adapter {final}" in next_commands(res)[0]
    # changing the base checkpoint invalidates fine-tuning and eval, not the data
    (model / "generation_config.json").write_text('{"max_new_tokens": 7}')
    res = run_recipe(load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides + ["stages=[data]"]), show_progress=False)
    assert [s.status for s in res.stages] == ["skipped"]
    from lmstack.pipeline import fingerprints, get_app

    before = json.loads((tmp_path / "run/state/finetune.json").read_text())["fingerprint"]
    stages = get_app("support").registry
    assert fingerprints(load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides), stages)["finetune"] != before
