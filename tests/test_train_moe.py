"""MoE runs log the expert utilization in metrics.jsonl and draw it in experts.png."""

from __future__ import annotations

import json

import torch

from tests.train_fixtures import write_shards

SMALL_MOE = dict(vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=4, max_position_embeddings=64)


def test_pretrain_logs_and_plots_expert_utilization(tmp_path):
    from lmstack.model.moe import SparseMoE
    from lmstack.train import pretrain
    from lmstack.train.config import PretrainConfig
    import lmstack.train.pretraining as P

    shards = write_shards(tmp_path / "s")
    cfg = PretrainConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"preset": "moe", "overrides": SMALL_MOE},
        "data": {"shards": str(shards), "seq_len": 16, "batch_size": 2},
        "train": {"steps": 3, "warmup_steps": 0, "log_every": 1, "device": "cpu", "tensorboard": False,
                  "plot": True, "peak_flops": 1e11}})
    seen: list[list[torch.Tensor]] = []  # per forward: each MoE layer's expert counts, from the gate's output

    real_fit = P.fit

    def spy_fit(model, *a, **kw):
        blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
        counts: list[torch.Tensor] = []

        def hook(mod, inp, out):
            if mod is blocks[0].gate:
                counts.clear()
            top = torch.topk(out.detach(), 2, -1).indices
            counts.append(torch.bincount(top.flatten(), minlength=4).float())
            if len(counts) == len(blocks):
                seen.append(list(counts))
        for b in blocks:
            b.gate.register_forward_hook(hook)
        return real_fit(model, *a, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    P.fit = spy_fit
    try:
        res = pretrain(cfg)
    finally:
        P.fit = real_fit
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in open(res.metrics_path)]
    util = [r["expert_utilization"] for r in rows if "loss" in r]
    assert len(util) == 3 and all(len(u) == 2 and len(u[0]) == 4 for u in util)
    # each logged step's shares are the counts of its (only) training forward, normalised by the slots (B*T*k)
    train_forwards = seen[:3]  # no validation forward before step 3's log (eval_every 200 > steps)
    for u, counts in zip(util, train_forwards):
        for row, c in zip(u, counts):
            torch.testing.assert_close(torch.tensor(row), c / c.sum(), atol=1e-5, rtol=0)
    png = tmp_path / "run" / "experts.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_runs_have_no_expert_utilization(tmp_path):
    from lmstack.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log({"step": 1, "loss": 3.0, "lr": 1e-3})
    log.plot()
    assert (tmp_path / "loss.png").is_file() and not (tmp_path / "experts.png").exists()
    log.log({"step": 2, "loss": 2.9, "lr": 1e-3, "expert_utilization": [[0.5, 0.5], [0.25, 0.75]]})
    log.plot()
    assert (tmp_path / "experts.png").is_file()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["expert_utilization"][1] == [0.25, 0.75]


def test_finetune_lora_on_experts_then_merged_model_matches_in_transformers(tmp_path):
    """`finetune` with LoRA on attention and on every expert's w1/w2/w3 of a tiny Mixtral: the expert adapters
    train (their B matrices leave zero), and the merged model saved by lmstack loads in transformers (whose Mixtral
    stores experts fused in 3-D tensors, so a per-expert peft adapter cannot load there) with lmstack's logits
    of base + adapter."""
    import transformers
    from safetensors.torch import load_file

    from lmstack.config import validate
    from lmstack.model import load_model, save_model
    from lmstack.tune.adapters import load_adapter
    from lmstack.tune.config import FinetuneConfig
    from lmstack.tune.lora import merge_lora
    from lmstack.tune.sft import finetune
    from lmstack.tokenizer import train_tokenizer
    from tests.model_fixtures import make_model
    from tests.tune_fixtures import CORPUS, SFT_ROWS, VOCAB, write_jsonl

    base_dir = tmp_path / "base"
    tok = train_tokenizer(CORPUS, vocab_size=VOCAB, out_dir=base_dir, show_progress=False)
    make_model("mixtral", base_dir, vocab_size=VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 2)
    cfg = validate(FinetuneConfig, {
        "model": str(base_dir), "method": "lora", "run_dir": str(tmp_path / "run"),
        "data": {"path": str(sft), "val_fraction": 0.0, "max_len": 128},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "w1", "w2", "w3"], "dropout": 0.0},
        "train": {"steps": 4, "lr": 2e-2, "warmup_steps": 1, "log_every": 2, "eval_every": 0, "ckpt_every": 0,
                  "tensorboard": False, "plot": False, "peak_flops": 1e12}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = finetune(cfg)
    finally:
        torch.set_num_threads(threads)
    ad = load_file(str(res.final_dir / "adapter_model.safetensors"))
    expert_b = [k for k in ad if ".experts." in k and "lora_B" in k]
    assert len(expert_b) == 2 * 4 * 3  # 2 layers x 4 experts x (w1, w2, w3)
    assert all(ad[k].abs().max() > 0 for k in expert_b)  # B starts at zero: each expert's adapter trained
    model = load_model(base_dir)
    load_adapter(model, res.final_dir)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    merge_lora(model)
    save_model(model, tmp_path / "merged", tokenizer_dir=base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert (load_model(base_dir)(ids) - ours).abs().max() > 1e-3  # the adapter changed the model
