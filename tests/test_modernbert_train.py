"""ModernBERT trainable (lmstack/model/modernbert.py): the training loss, every gradient and one AdamW step equal
transformers' on random tiny configs (masked LM and sequence classification, a padded batch longer than the local
window); `lmstack pretrain` with the modernbert-tiny preset writes a ModernBertForMaskedLM directory transformers
loads with the same logits; `lmstack classify train --model MODERNBERT_DIR` (text and tokens) writes
ModernBertFor{Sequence,Token}Classification directories transformers loads with the same logits; LoRA on its
Wqkv / Wo / Wi matches peft."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmstack.model.encoder import load_encoder
from tests.test_model_modernbert import IDS, MASK, tiny
from tests.test_train_mlm_cli import mask_tokenizer_json, run_cli
from tests.train_fixtures import write_shards


def _loss(cls_name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if cls_name == "ModernBertForMaskedLM":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("cls_name, kw", [
    ("ModernBertForMaskedLM", {}),
    ("ModernBertForSequenceClassification", {"num_labels": 3, "classifier_pooling": "mean"}),
])
def test_loss_grads_and_one_adamw_step_match_transformers(cls_name, kw, tmp_path):
    hf = tiny(cls_name, tmp_path, **kw).train()
    ours = load_encoder(tmp_path).train()
    g = torch.Generator().manual_seed(1)
    if cls_name == "ModernBertForMaskedLM":
        labels = torch.where((torch.rand(IDS.shape, generator=g) < 0.3) & MASK.bool(), IDS, -100)
    else:
        labels = torch.tensor([0, 2, 1])
    ref = hf(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    got = _loss(cls_name, ours(IDS, MASK), labels)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    for name, p in mine.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    for model in (hf, ours):
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01).step()
    for name, p in mine.items():
        torch.testing.assert_close(p.detach(), theirs[name].detach(), atol=1e-6, rtol=1e-5, msg=name)


def test_pretrain_modernbert_tiny_mlm(tmp_path):
    import transformers

    shards = write_shards(tmp_path / "s", train_tokens=3000, tokenizer_json=mask_tokenizer_json())
    cfg = tmp_path / "mlm.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        "model: {arch: encoder, preset: modernbert-tiny, overrides: {hidden_size: 32, intermediate_size: 48,"
        " local_attention: 8}}\n"
        f"data: {{shards: {shards}, seq_len: 32, batch_size: 8}}\n"
        "train: {steps: 12, lr: 3.0e-3, warmup_steps: 2, log_every: 3, eval_every: 0, ckpt_every: 0,"
        " device: cpu, tensorboard: false, plot: false, peak_flops: 1.0e11}\n")
    rc, out = run_cli("pretrain", "--config", str(cfg))
    assert rc == 0, out
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < losses[0]
    final = tmp_path / "run" / "final"
    conf = json.loads((final / "config.json").read_text())
    assert conf["architectures"] == ["ModernBertForMaskedLM"] and conf["model_type"] == "modernbert"
    assert (final / "tokenizer.json").is_file()
    hf = transformers.ModernBertForMaskedLM.from_pretrained(final).eval()
    ids = torch.tensor([[5, 6, 7, 255, 9, 10, 2, 30, 31, 32, 33, 34, 35, 36]])
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(final)(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    # continued MLM from the saved directory (model.from_dir): starts where the first run ended
    cfg2 = tmp_path / "more.yaml"
    cfg2.write_text(cfg.read_text().replace(str(tmp_path / "run"), str(tmp_path / "more")).replace(
        "model: {arch: encoder, preset: modernbert-tiny, overrides: {hidden_size: 32, intermediate_size: 48,"
        " local_attention: 8}}", f"model: {{arch: encoder, from_dir: {final}}}").replace("steps: 12", "steps: 3"))
    rc, out = run_cli("pretrain", "--config", str(cfg2))
    assert rc == 0, out
    more = [json.loads(x)["loss"] for x in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]
    assert more[0] < losses[0]
    assert json.loads((tmp_path / "more" / "final" / "config.json").read_text())["architectures"] == \
        ["ModernBertForMaskedLM"]


TEXTS = {"refund": ["I want my money back", "please refund my order", "refund the payment now",
                    "give me a refund", "money back for this order", "can I get a refund"],
         "track": ["where is my package", "track my parcel please", "when will the package arrive",
                   "my order has not arrived", "package tracking number", "where is the parcel"]}


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory):
    """A random ModernBertForMaskedLM with a BERT-style byte-level BPE tokenizer ([CLS] text [SEP])."""
    import transformers

    from lmstack.model.classify import _train_tokenizer

    path = tmp_path_factory.mktemp("mbert")
    texts = [t for v in TEXTS.values() for t in v] * 3
    tok = _train_tokenizer(texts, 300, path, 64)
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=3, num_attention_heads=2, local_attention=8,
                                        max_position_embeddings=128, pad_token_id=tok.token_to_id("[PAD]"),
                                        cls_token_id=tok.token_to_id("[CLS]"), sep_token_id=tok.token_to_id("[SEP]"),
                                        bos_token_id=None, eos_token_id=None)
    transformers.ModernBertForMaskedLM(cfg).save_pretrained(path)
    return path


def test_classify_train_from_a_modernbert_dir(modernbert_dir, tmp_path):
    import transformers

    from lmstack.model.classify import Classifier, encode_batch

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": k}) + "\n" for k, v in TEXTS.items() for t in v))
    rc, out = run_cli("classify", "train", "--model", str(modernbert_dir), "--data", str(data), "--eval-data",
                      str(data), "--epochs", "3", "--out", str(tmp_path / "clf"))
    assert rc == 0, out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_records"] == 12
    conf = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert conf["architectures"] == ["ModernBertForSequenceClassification"]
    assert sorted(conf["id2label"].values()) == ["refund", "track"]
    clf = Classifier(tmp_path / "clf")
    hf = transformers.ModernBertForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    ids, mask = encode_batch(clf.tok, TEXTS["refund"][:3], 64, clf.model.config.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(clf.model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-4)
    # the body started from the initial directory, not from scratch: far closer to it than a fresh init is
    init = load_encoder(modernbert_dir).state_dict()["model.layers.1.attn.Wqkv.weight"]
    tuned = clf.model.state_dict()["model.layers.1.attn.Wqkv.weight"]
    assert (tuned - init).abs().max() < 0.25 * init.abs().max()


def test_token_classify_train_from_a_modernbert_dir(modernbert_dir, tmp_path):
    import transformers

    data = tmp_path / "t.jsonl"
    rows = [{"tokens": ["refund", "order", "42"], "tags": ["O", "O", "B-NUM"]},
            {"tokens": ["package", "7", "late"], "tags": ["O", "B-NUM", "O"]}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out = run_cli("classify", "train", "--task", "tokens", "--model", str(modernbert_dir), "--data", str(data),
                      "--epochs", "2", "--out", str(tmp_path / "tag"))
    assert rc == 0, out
    conf = json.loads((tmp_path / "tag" / "config.json").read_text())
    assert conf["architectures"] == ["ModernBertForTokenClassification"]
    ours = load_encoder(tmp_path / "tag")
    hf = transformers.ModernBertForTokenClassification.from_pretrained(tmp_path / "tag").eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 20, 30, 40, 2]])
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    rc, out = run_cli("classify", "predict", str(tmp_path / "tag"), "refund order 42")
    assert rc == 0 and "entities" in out, out


def test_lora_on_modernbert_matches_peft(tmp_path):
    import peft

    from lmstack.tune.adapters import save_lora_adapter
    from lmstack.tune.lora import LoraSpec, apply_lora

    hf = tiny("ModernBertForMaskedLM", tmp_path / "base")
    ours = load_encoder(tmp_path / "base")
    spec = LoraSpec(r=4, alpha=8, target_modules=["Wqkv", "Wo", "Wi"])
    apply_lora(ours, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, _ in ours.named_parameters() if "lora_" in n}
    save_lora_adapter(ours, tmp_path / "adapter", spec)
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS, MASK)[MASK.bool()],
                                   ref(input_ids=IDS, attention_mask=MASK).logits[MASK.bool()], atol=1e-4, rtol=1e-4)
