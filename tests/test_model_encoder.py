"""The BERT-style encoder against transformers on tiny random configs: BertModel hidden states, masked-LM,
sequence- and token-classification logits (load and save), mean-pooled embeddings against the formula on
transformers' hidden states, BERT's 80/10/10 dynamic masking by counting, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from lmstack.errors import CheckpointError
from lmstack.model.encoder import IGNORE_INDEX, EncoderConfig, load_encoder, mlm_inputs, save_encoder

HEAD_CLASSES = {"base": "BertModel", "mlm": "BertForMaskedLM", "seq_cls": "BertForSequenceClassification",
                "tok_cls": "BertForTokenClassification"}


def make_bert(head: str, path, seed: int = 0, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, max_position_embeddings=40, num_labels=3,
                                  **kw)
    model = getattr(transformers, HEAD_CLASSES[head])(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(path)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as BERT tokenizers pad
    mask[2, 4:] = 0
    tt = torch.zeros_like(ids)
    tt[0, 6:] = 1  # a sentence pair
    return ids.masked_fill(mask == 0, 0), mask, tt


def reference(model, head, ids, mask, tt):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    return out.last_hidden_state if head == "base" else out.logits


@pytest.mark.parametrize("head", list(HEAD_CLASSES))
@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_encoder_matches_transformers_and_saves(head, act, tmp_path):
    import transformers

    hf = make_bert(head, tmp_path / "hf", hidden_act=act)
    ours = load_encoder(tmp_path / "hf")
    assert ours.config.head == head
    ids, mask, tt = batch()
    want = reference(hf, head, ids, mask, tt)
    with torch.no_grad():
        got = ours(ids, mask, tt)
    sel = mask.bool() if head != "seq_cls" else slice(None)
    assert_close(got[sel], want[sel], atol=1e-5, rtol=1e-4)
    out = save_encoder(ours, tmp_path / "out")
    back = getattr(transformers, HEAD_CLASSES[head]).from_pretrained(out).eval()
    assert_close(reference(back, head, ids, mask, tt)[sel], want[sel], atol=1e-6, rtol=1e-5)


def test_mean_pooled_embeddings(tmp_path):
    hf = make_bert("base", tmp_path)
    ours = load_encoder(tmp_path)
    ids, mask, tt = batch()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.embed(ids, mask)
    for b in range(3):  # the average of the real tokens' hidden states, row by row
        n = int(mask[b].sum())
        assert_close(got[b], h[b, :n].mean(0), atol=1e-5, rtol=1e-4)


def test_mlm_masking_80_10_10():
    V, MASK, CLS, PAD = 1000, 3, 1, 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (400, 512), generator=g)
    ids[:, 0] = CLS
    attn = torch.ones_like(ids)
    attn[:, 400:] = 0
    ids = ids.masked_fill(attn == 0, PAD)
    inputs, labels = mlm_inputs(ids, mask_token_id=MASK, vocab_size=V, special_ids={CLS, PAD},
                                attention_mask=attn, generator=torch.Generator().manual_seed(1))
    sel = labels != IGNORE_INDEX
    eligible = (attn == 1) & (ids != CLS)
    assert not sel[~eligible].any()  # specials and padding are never chosen
    assert torch.equal(labels[sel], ids[sel])
    assert torch.equal(inputs[~sel], ids[~sel])  # everything else untouched
    n = int(sel.sum())
    assert abs(n / int(eligible.sum()) - 0.15) < 0.003
    masked = (inputs[sel] == MASK).sum().item() / n
    kept = (inputs[sel] == ids[sel]).sum().item() / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01


@pytest.mark.parametrize("field,value,words", [("is_decoder", True, "is_decoder"),
                                               ("position_embedding_type", "relative_key", "relative_key"),
                                               ("hidden_act", "mish", "mish")])
def test_unsupported_bert_fields_refused(field, value, words, tmp_path):
    make_bert("base", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_encoder(tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_encoder_config_roundtrip_through_transformers():
    import transformers

    c = EncoderConfig(vocab_size=77, hidden_size=32, num_attention_heads=4, head="seq_cls",
                      id2label={0: "billing", 1: "refund"})
    hf = transformers.AutoConfig.for_model(**c.to_hf())
    assert hf.id2label == {0: "billing", 1: "refund"} and hf.num_labels == 2
    back = EncoderConfig.from_hf(hf.to_dict())
    assert back.id2label == c.id2label and back.vocab_size == 77 and back.head == "seq_cls"


def test_mlm_pretraining_through_fit_on_token_shards(tmp_path):
    """The encoder trains with the one loop on PackedBatches (the decoder's token-shard batches): the masked-LM
    loss falls, and final/ is a BertForMaskedLM directory transformers loads to the same logits."""
    import numpy as np
    import transformers

    from lmstack.model.encoder import Encoder, EncoderConfig
    from lmstack.train import TrainConfig, fit
    from lmstack.train.data import PackedBatches
    from lmstack.train.mlm import masked_lm_loss, save_encoder_fn

    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 60) ** 1.5  # Zipf-like ids 5..63 (0..4 are special): entropy 2.36 nats vs ln 59 = 4.08
    toks = [int(t) for t in rng.choice(np.arange(5, 64), size=6000, p=p / p.sum())]
    batches = PackedBatches([np.array(toks, dtype=np.uint16)], seq_len=32, batch_size=8, seed=0)
    cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, head="mlm",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Encoder(cfg).init_weights(0)
    tc = TrainConfig(steps=40, lr=3e-3, warmup_steps=2, log_every=5, eval_every=0, ckpt_every=0, device="cpu",
                     dtype="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 40k-parameter model: one thread is fastest, and robust to a busy machine
    try:
        res = fit(model, batches, masked_lm_loss(mask_token_id=3, vocab_size=64, special_ids={0, 1, 2, 3, 4}), tc,
                  tmp_path / "run", save_model_fn=save_encoder_fn)
    finally:
        torch.set_num_threads(threads)
    losses = [json.loads(line)["loss"] for line in open(res.metrics_path) if '"loss"' in line]
    assert losses[0] > 3.5 and sum(losses[-3:]) / 3 < 2.9  # from ~ln 59 toward the unigram entropy
    hf = transformers.BertForMaskedLM.from_pretrained(res.final_dir).eval()
    ids = torch.tensor([toks[:20]])
    with torch.no_grad():
        assert_close(load_encoder(res.final_dir)(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
