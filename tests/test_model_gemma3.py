"""Gemma 3's text decoder against transformers' ``Gemma3ForCausalLM`` on random tiny configs: logits (with
sequences longer than the sliding window, so the sliding / global pattern matters), padded batches, the KV cache,
save -> transformers round trip, and final-logit soft-capping."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmstack.errors import CheckpointError
from lmstack.model import KVCache, ModelConfig, load_model, save_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast on a quiet machine and far faster on a loaded one (no spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_gemma3(**kw):
    import transformers

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, max_position_embeddings=256, sliding_window=5,
               layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
               query_pre_attn_scalar=24, rope_parameters={
                   "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
               bos_token_id=2, eos_token_id=1, pad_token_id=0)
    cfg.update(kw)
    return transformers.Gemma3TextConfig(**cfg)


def make_gemma3(path, seed: int = 0, **kw):
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_gemma3(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)  # (1 + w) norms start at 0: randomise so a wrong norm shows
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def _ids(T: int, B: int = 2, seed: int = 1):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{}, {"final_logit_softcapping": 3.0, "attention_bias": True},
                                {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                        "rope_theta": 10000.0},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 10.0}},
                                 "tie_word_embeddings": False, "hidden_activation": "gelu"}],
                         ids=["plain", "softcap-bias", "linear-rope-untied-gelu"])
def test_logits_match_transformers(tmp_path, kw):
    ref = make_gemma3(tmp_path / "hf", **kw)
    model = load_model(tmp_path / "hf", device="cpu", dtype="float32")
    assert model.config.layer_types[2] == "full_attention" and model.config.sliding_window == 5
    ids = _ids(13)  # longer than the window: sliding layers see 5 keys, the global layer all
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    # save -> transformers reads it back to the same logits
    save_model(model, tmp_path / "out")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(back(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert ModelConfig.from_hf(tmp_path / "out").layer_types == model.config.layer_types


def test_padding_and_kv_cache_match_full_pass(tmp_path):
    ref = make_gemma3(tmp_path / "hf")
    model = load_model(tmp_path / "hf", device="cpu", dtype="float32")
    ids = _ids(12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on row 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
        assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
        # incremental decoding through the contiguous KV cache: prompt of 4, then one token at a time
        cfg = model.config
        cache = KVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.head_dim, 16, torch.float32,
                        torch.device("cpu"), sliding_window=cfg.attention_window)
        outs = []
        pos = 0
        for chunk in (ids[:, :4], *ids[:, 4:].split(1, 1)):
            T = chunk.shape[1]
            p = torch.arange(pos, pos + T)[None].expand(2, T)
            outs.append(model(chunk, position_ids=p, ctx=cache))
            cache.advance(T)
            pos += T
    assert_close(torch.cat(outs, 1), ref(ids).logits.detach(), rtol=1e-4, atol=1e-4)


def test_refuses_attention_softcapping(tmp_path):
    make_gemma3(tmp_path / "hf", attn_logit_softcapping=50.0)
    with pytest.raises(CheckpointError, match="attn_logit_softcapping"):
        load_model(tmp_path / "hf")


def test_multimodal_gemma3_is_refused_with_a_hint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma3"}')
    with pytest.raises(CheckpointError, match="gemma3_text"):
        ModelConfig.from_hf(tmp_path)


def test_engine_paged_cache_matches_transformers(tmp_path):
    """The serving engine over the paged KV pool (batched decodes, chunked prefill, 4-token blocks): every
    generated token is transformers' argmax, with prompts and outputs longer than the sliding window (5)."""
    from lmstack.serve.llm import LLM
    from lmstack.serve.runner import kernel_supported
    from tests.engine_fixtures import hf_greedy, hf_is_greedy

    ref = make_gemma3(tmp_path / "hf")
    model = load_model(tmp_path / "hf", device="cpu")
    assert "eager" in kernel_supported(model)
    prompts = [list(range(5, 25)), [30, 31, 32], [40, 41] * 9 + [7]]
    greedy = dict(temperature=0, max_tokens=14, ignore_eos=True)
    want = hf_greedy(ref, prompts[0], 14)
    for kw in ({}, {"block_size": 4, "max_num_batched_tokens": 7}):
        llm = LLM(model, **kw)
        outs = llm.generate(prompts, **greedy)
        assert outs[0].outputs[0].token_ids == want
        for o, p in zip(outs, prompts):
            assert o.outputs[0].token_ids == hf_is_greedy(ref, p, o.outputs[0].token_ids)
        assert llm.generate(prompts[2], **greedy)[0].outputs[0].token_ids == outs[2].outputs[0].token_ids


def test_lora_finetune_cli_trains_and_merges(tmp_path, capsys):
    """``lmstack finetune --method lora`` on a tiny Gemma 3 (with a trained BPE tokenizer): the SFT loss falls, and
    the merged model equals base + adapter."""
    from lmstack.cli import main
    from lmstack.tokenizer import Tokenizer, train_tokenizer
    from lmstack.tune.adapters import load_adapter
    from lmstack.tune.batches import collate_sft
    from lmstack.tune.data import load_sft
    from lmstack.tune.losses import forward_logits, token_ce
    from tests.tune_fixtures import CORPUS, SFT_ROWS, VOCAB, write_jsonl

    mdir = tmp_path / "gemma"
    tok = train_tokenizer(CORPUS, vocab_size=VOCAB, out_dir=mdir, show_progress=False)
    make_gemma3(mdir, vocab_size=VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 2)
    batch = collate_sft(load_sft(sft, Tokenizer.from_dir(mdir), 256)[0], tok.pad_token_id)

    def loss(model):
        with torch.no_grad():
            return float(token_ce(forward_logits(model, batch), batch["labels"])[0])

    run = tmp_path / "run"
    rc = main(["finetune", "--model", str(mdir), "--data", str(sft), "--method", "lora", "--lora.r", "4",
               "--lora.target_modules", "all-linear", "--train.steps", "8", "--train.lr", "0.02",
               "--train.tensorboard=false", "--train.plot=false", "--run-dir", str(run)])
    assert rc == 0 and "completed: 8 steps" in capsys.readouterr().out
    base = load_model(mdir)
    before = loss(base)
    load_adapter(base, run / "final")
    assert loss(base) < before - 0.3
    assert main(["merge", "--model", str(mdir), "--adapter", str(run / "final"), "--out", str(tmp_path / "m")]) == 0
    merged = load_model(tmp_path / "m")
    with torch.no_grad():
        assert_close(merged(batch["input_ids"]), base(batch["input_ids"]), rtol=1e-4, atol=1e-4)
