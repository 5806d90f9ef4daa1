"""T5 / Flan-T5 encoder-decoder against transformers' ``T5ForConditionalGeneration`` on random tiny configs (v1.0
ReLU with the tied-embedding output scaling, v1.1 gated-GELU without it): logits with padded batches, greedy
output, the cached decoder equal to the uncached one, save -> transformers round trip, the bucket function."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from lmstack.errors import CheckpointError
from lmstack.model.seq2seq import load_seq2seq, relative_position_bucket, save_seq2seq


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast on a quiet machine and far faster on a loaded one (no spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VARIANTS = {"v1.0-relu": dict(feed_forward_proj="relu"),
            "v1.1-gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def make_t5(path, seed: int = 0, **kw):
    import transformers

    cfg = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12, decoder_start_token_id=0,
               pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"t5_{request.param}")
    ref = make_t5(path, **VARIANTS[request.param])
    return ref, load_seq2seq(path, device="cpu", dtype="float32"), path


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 128, (2, 19), generator=g)  # longer than max_distance: the log buckets are used
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding on row 1
    return ids, mask, torch.randint(2, 128, (2, 16), generator=g)


def test_logits_match_transformers(pair, tmp_path):
    ref, model, _ = pair
    ids, mask, dec = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert_close(model(ids, dec, mask), want, rtol=1e-4, atol=1e-4)
        assert_close(model.encode(ids, mask), ref.encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                     rtol=1e-5, atol=1e-5)
    save_seq2seq(model, tmp_path / "out")
    import transformers

    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, want, rtol=1e-4,
                     atol=1e-4)


def test_greedy_matches_transformers_and_cache_matches_recompute(pair):
    ref, model, _ = pair
    ids, mask, _ = _batch()
    got = model.generate(ids, mask, max_new_tokens=20)
    again = model.generate(ids, mask, max_new_tokens=20, use_cache=False)
    assert got == again
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, num_beams=1,
                        use_cache=False)  # transformers 5.25 cache breaks with num_decoder_layers != num_layers
    for row, w in zip(got, want.tolist()):
        w = w[1:]  # transformers starts with decoder_start_token_id
        assert row == w[:len(row)]
        assert len(row) == 20 or row[-1] == 1


def test_bucket_function_against_the_closed_form():
    """Independent check of the bucket rule on hand-worked values (num_buckets 8, max_distance 12): exact
    buckets for |rel| < 2 (bidirectional: 4 per sign) and log-spaced ones beyond."""
    rel = torch.tensor([-20, -12, -5, -2, -1, 0, 1, 2, 5, 12, 20])
    # bidirectional: 4 buckets per side, exact below 2; log buckets 2 + floor(log(r/2)/log(6) * 2), capped at 3
    want_bi = [3, 3, 3, 2, 1, 0, 5, 6, 7, 7, 7]
    assert relative_position_bucket(rel, True, 8, 12).tolist() == want_bi
    # causal: keys after the query share bucket 0; 8 buckets, exact below 4
    want_uni = [7, 7, 4, 2, 1, 0, 0, 0, 0, 0, 0]
    assert relative_position_bucket(rel, False, 8, 12).tolist() == want_uni


def test_bad_directory_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5", "feed_forward_proj": "gated-gelu-x"}')
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        load_seq2seq(tmp_path)


PAIRS = [{"input": "translate: hello world", "output": "bonjour le monde"},
         {"input": "translate: thank you", "output": "merci"},
         {"input": "translate: good night", "output": "bonne nuit"},
         {"source": "translate: the cat", "target": "le chat"}]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny v1.1 T5 whose directory holds a trained BPE tokenizer (so the CLI can run it end to end)."""
    from lmstack.tokenizer import train_tokenizer
    from tests.tune_fixtures import CORPUS

    path = tmp_path_factory.mktemp("t5cli")
    tok = train_tokenizer(CORPUS + [p.get("input", p.get("source")) + " " + p.get("output", p.get("target"))
                                    for p in PAIRS] * 3, vocab_size=320, out_dir=path, show_progress=False)
    make_t5(path, vocab_size=320, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id, num_decoder_layers=2)
    import json

    (path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS) + "not json\n")
    return path


def test_full_and_lora_finetune_then_generate_cli(t5_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from lmstack.cli import main
    from lmstack.tune.seq2seq import generate_text

    rc = main(["seq2seq", "train", "--model", str(t5_dir), "--data", str(t5_dir / "pairs.jsonl"), "--out",
               str(tmp_path / "full"), "--steps", "40", "--lr", "0.01", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 pairs, full fine-tuning" in out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["last_loss"] < 0.2 * res["first_loss"]
    # the memorised pair comes back through `lmstack generate` (greedy) and the library call alike
    rc = main(["generate", "--model", str(tmp_path / "full"), "-p", "translate: thank you", "-t", "0", "-n", "8"])
    text = capsys.readouterr().out.strip()
    assert rc == 0 and text == generate_text(tmp_path / "full", ["translate: thank you"], max_new_tokens=8)[0]
    assert text == "merci"
    # LoRA on q, v: the merged output differs from the base only in those projections
    rc = main(["seq2seq", "train", "--model", str(t5_dir), "--data", str(t5_dir / "pairs.jsonl"), "--out",
               str(tmp_path / "lora"), "--steps", "30", "--lr", "0.02", "--lora-r", "4", "--batch-size", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["last_loss"] < 0.7 * res["first_loss"] and res["trainable"] < res["total"] // 5
    base, tuned = load_file(str(t5_dir / "model.safetensors")), load_file(str(tmp_path / "lora" / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed)


def test_decoder_verbs_point_to_seq2seq(t5_dir, tmp_path, capsys):
    """``lmstack finetune`` and ``lmstack serve`` on a T5 directory: exit 2, one line naming the seq2seq verbs."""
    from lmstack.cli import main

    rc = main(["finetune", "--model", str(t5_dir), "--data", str(t5_dir / "pairs.jsonl"), "--run-dir",
               str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "lmstack seq2seq train" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", str(t5_dir), "-p", "hi", "--top-k", "3"]) == 2
    assert "T5-family" in capsys.readouterr().err


def test_untied_lm_head_file_loads_untied(tmp_path):
    """A Flan-T5 / mT5-style file with its own ``lm_head.weight`` (what transformers 4 wrote for v1.1) keeps it:
    the reference is transformers' model with its head untied by hand to the same weight."""
    from safetensors.torch import load_file, save_file

    ref = make_t5(tmp_path, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    head = torch.randn(128, 32, generator=torch.Generator().manual_seed(5))
    sd = load_file(str(tmp_path / "model.safetensors"))
    save_file({**sd, "lm_head.weight": head}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref.lm_head.weight = torch.nn.Parameter(head.clone())
    model = load_seq2seq(tmp_path)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.shared.weight
    ids, mask, dec = _batch()
    with torch.no_grad():
        assert_close(model(ids, dec, mask), ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                     rtol=1e-4, atol=1e-4)
    save_seq2seq(model, tmp_path / "out")
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["lm_head.weight"], head)
