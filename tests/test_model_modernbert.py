"""ModernBERT (lmstack/model/modernbert.py) against transformers on random tiny configs: hidden states, masked-LM
sequence- and token-classification logits on a right-padded batch longer than the local window (global and local
layers, both poolings), load -> save -> transformers loads the same logits, and bad configs refused."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.errors import CheckpointError
from lmstack.model.modernbert import load_modernbert, save_modernbert

IDS = torch.randint(5, 120, (3, 20), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 14:] = 0
MASK[2, 7:] = 0


def tiny(cls_name: str, path, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, max_position_embeddings=64, local_attention=8,
                                        global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, cls_token_id=1, sep_token_id=2, **kw)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missing one shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def hf_out(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("cls_name, kw", [
    ("ModernBertModel", {}),
    ("ModernBertForMaskedLM", {}),
    ("ModernBertForMaskedLM", {"norm_bias": True, "attention_bias": True, "mlp_bias": True,
                               "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": False}),
    ("ModernBertForSequenceClassification", {"num_labels": 3}),
    ("ModernBertForSequenceClassification", {"num_labels": 3, "classifier_pooling": "mean", "classifier_bias": True}),
    ("ModernBertForTokenClassification", {"num_labels": 5}),
])
def test_modernbert_matches_transformers_and_round_trips(cls_name, kw, tmp_path):
    import transformers

    hf = tiny(cls_name, tmp_path / "hf", **kw)
    ours = load_modernbert(tmp_path / "hf")
    want = hf_out(hf)
    with torch.no_grad():
        got = ours(IDS, MASK)
    real = MASK.bool() if got.ndim == 3 else torch.ones(got.shape[0], dtype=torch.bool)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)  # padded rows' outputs are unused
    save_modernbert(ours, tmp_path / "ours")
    back = getattr(transformers, cls_name).from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_out(back)[real], want[real], atol=1e-5, rtol=1e-4)


def test_local_window_matters(tmp_path):
    """The local layers really see only +-local_attention/2: widening the window changes the output."""
    tiny("ModernBertModel", tmp_path)
    m = load_modernbert(tmp_path)
    with torch.no_grad():
        a = m(IDS)
        m.config.local_attention = 64
        b = m(IDS)
    assert (a - b).abs().max() > 1e-3


def test_modernbert_refusals(tmp_path):
    tiny("ModernBertForMaskedLM", tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["classifier_pooling"] = "max"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="classifier_pooling 'max'"):
        load_modernbert(tmp_path)
    conf.update(classifier_pooling="cls", architectures=["ModernBertForQuestionAnswering"])
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="ModernBertForQuestionAnswering"):
        load_modernbert(tmp_path)
