"""Text classification with the BERT-style encoder: train, evaluate, predict (``lmstack classify``).

The first user is intent recognition (the support assistant's intents, English and Chinese; a labelled set ships
in ``lmstack/model/data/intents.jsonl``). ``train_classifier`` reads JSON Lines records ``{"text", "label"[,
"split"]}``, trains a byte-level BPE tokenizer on the training texts (or uses ``init``'s), builds a small
:class:`~lmstack.model.encoder.Encoder` with a sequence-classification head (or fine-tunes ``init``, any local
BERT directory), trains it with AdamW and cross-entropy, and writes a Hugging Face ``BertForSequenceClassification``
directory (``transformers`` loads it) with ``metrics.json``: accuracy and macro-F1 on the held-out records
(macro-F1: the unweighted mean over labels of 2PR / (P + R), Manning et al. 2008, 13.6), per language too.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError, DataError
from lmstack.model.encoder import Encoder, EncoderConfig, load_encoder, save_encoder, with_head
from lmstack.utils.io import atomic_write_json, iter_jsonl_lines

SHIPPED_INTENTS = Path(__file__).with_name("data") / "intents.jsonl"
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
MAX_DATA_BYTES = 256 << 20  # a labelled set larger than this is not what this trainer is for
MAX_TEXT_CHARS = 10_000


@dataclass
class ClassifyConfig:
    data: str = str(SHIPPED_INTENTS)  # JSON Lines: {"text": ..., "label": ..., optional "split": train|test}
    out: str = "runs/classifier"
    eval_data: str | None = None  # held-out records; default: the records with "split": "test"
    init: str | None = None  # a local BERT / ModernBERT directory to fine-tune; default: a fresh small BERT
    text_field: str = "text"
    label_field: str = "label"
    vocab_size: int = 600  # small: 120 sentences do not support many merges (measured: 0.40 vs 0.25 acc with 2000)
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 64
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    dropout: float = 0.1
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (equal-step comparisons across data sizes)

    def __post_init__(self) -> None:
        for k in ("epochs", "batch_size", "max_length", "hidden_size", "num_hidden_layers"):
            if getattr(self, k) < 1:
                raise ConfigError(f"classify.{k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ConfigError(f"classify.lr must be > 0, got {self.lr}")


# ---------------------------------------------------------------------------------------------- data
def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label", *,
                  max_bytes: int = MAX_DATA_BYTES, max_text_chars: int = MAX_TEXT_CHARS, int_labels: bool = True,
                  what: str = "classify data") -> list[dict[str, Any]]:
    """Records of a labelled JSON Lines file; a malformed record stops with ``file:line`` and what to fix. Texts
    are cut at ``max_text_chars``; labels are strings (``int_labels``: integers too, read as their string)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: labelled data file not found")
    if p.stat().st_size > max_bytes:
        raise DataError(f"{p}: {p.stat().st_size:,} bytes is over the {max_bytes:,}-byte limit for {what}")

    def bad(lineno: int, reason: str) -> None:
        raise DataError(f"{p}:{lineno}: {reason}")

    rows = []
    for lineno, r in iter_jsonl_lines(p, bad):
        if not isinstance(r, dict) or not isinstance(r.get(text_field), str) or not r[text_field].strip():
            bad(lineno, f'expected an object with a non-empty string "{text_field}"')
        label = r.get(label_field)
        if not isinstance(label, (str, int) if int_labels else str) or isinstance(label, bool):
            bad(lineno, f'expected a string "{label_field}"')
        rows.append({**r, text_field: r[text_field][:max_text_chars], label_field: str(label)})
    if not rows:
        raise DataError(f"{p}: no records")
    return rows


# ---------------------------------------------------------------------------------------------- metrics
def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    return sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean over ``labels`` (default: every label in gold or pred) of F1 = 2TP / (2TP + FP + FN);
    a label with no gold and no predicted item scores 0 (as scikit-learn's ``zero_division=0``)."""
    labels = sorted(set(gold) | set(pred)) if labels is None else list(labels)
    scores = []
    for lab in labels:
        tp = sum(g == lab and p == lab for g, p in zip(gold, pred))
        fp = sum(g != lab and p == lab for g, p in zip(gold, pred))
        fn = sum(g == lab and p != lab for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


# ---------------------------------------------------------------------------------------------- tokenizer
def _train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, max_length: int):
    """Byte-level BPE with BERT's special tokens; its post-processor wraps a text as [CLS] text [SEP] (so
    ``transformers.AutoTokenizer`` gives the same ids)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    from lmstack.tokenizer import Tokenizer, train_tokenizer

    train_tokenizer(iter(texts), vocab_size=vocab_size, out_dir=out_dir, special_tokens=SPECIALS,
                    chat_template=None, show_progress=False, min_frequency=1, model_max_length=max_length)
    backend = Backend.from_file(str(out_dir / "tokenizer.json"))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    backend.save(str(out_dir / "tokenizer.json"))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", unk_token="[UNK]",
               bos_token=None, eos_token=None)
    atomic_write_json(cfg_path, cfg)
    return Tokenizer.from_dir(out_dir)


def encode_batch(tok, texts: Sequence[str], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, T): [CLS] text [SEP], truncated to max_length, right-padded."""
    rows = [ids[:max_length - 1] + ids[-1:] if len(ids) > max_length else ids
            for ids in tok.encode_batch(list(texts), add_special_tokens=True)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------- train / predict
def encoder_for(cfg: Any, head: str, labels: Sequence[str], texts: Sequence[str], tmp: str | Path):
    """(model, tokenizer, tokenizer directory) of a classifier run: the body of ``cfg.init`` (an encoder directory)
    under a fresh ``head``, or a fresh encoder of ``cfg``'s size with a tokenizer trained on ``texts`` in ``tmp``."""
    from lmstack.tokenizer import Tokenizer

    id2label = dict(enumerate(labels))
    if cfg.init:
        tok_dir = Path(cfg.init)
        tok = Tokenizer.from_dir(tok_dir)
        model = with_head(load_encoder(cfg.init), head, id2label, cfg.seed)  # BERT or ModernBERT body
        return model, tok, tok_dir
    tok_dir = Path(tmp)
    tok = _train_tokenizer(list(texts), cfg.vocab_size, tok_dir, max(cfg.max_length, 8))
    ecfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         intermediate_size=cfg.intermediate_size, max_position_embeddings=max(cfg.max_length, 8),
                         hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                         pad_token_id=tok.token_to_id("[PAD]"), head=head, id2label=id2label)
    return Encoder(ecfg).init_weights(cfg.seed), tok, tok_dir


def fit_encoder(model: Encoder, ids: torch.Tensor, mask: torch.Tensor, cfg: Any, steps: int,
                loss_of: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> list[float]:
    """AdamW with linear warm-up (10%) and decay over ``steps``, shuffled batches of ``cfg.batch_size`` for
    ``cfg.epochs`` (at most ``steps``), clipped gradients; ``loss_of(logits, batch_index, T)``. Returns the losses;
    the model is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses: list[float] = []
    for _ in range(cfg.epochs):
        for b in torch.randperm(len(ids), generator=g).split(cfg.batch_size):
            if len(losses) >= steps:
                break
            T = int(mask[b].sum(1).max())
            loss = loss_of(model(ids[b, :T], mask[b, :T]), b, T)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    return losses


def train_classifier(cfg: ClassifyConfig) -> dict[str, Any]:
    """Train (setup -> loop -> save) and return the metrics written to ``OUT/metrics.json``."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rows = read_labelled(cfg.data, cfg.text_field, cfg.label_field)
    if cfg.eval_data:
        train_rows, eval_rows = rows, read_labelled(cfg.eval_data, cfg.text_field, cfg.label_field)
    else:
        train_rows = [r for r in rows if r.get("split", "train") != "test"]
        eval_rows = [r for r in rows if r.get("split") == "test"]
    if not train_rows:
        raise DataError(f"{cfg.data}: no training records (every record has split=test)")
    labels = sorted({r[cfg.label_field] for r in train_rows})
    if len(labels) < 2:
        raise DataError(f"{cfg.data}: needs at least 2 labels to classify, found {labels}")
    unknown = sorted({r[cfg.label_field] for r in eval_rows} - set(labels))
    if unknown:
        raise DataError(f"{cfg.eval_data or cfg.data}: held-out labels {unknown} never occur in training")
    lab2id = {lab: i for i, lab in enumerate(labels)}
    texts = [r[cfg.text_field] for r in train_rows]
    y = torch.tensor([lab2id[r[cfg.label_field]] for r in train_rows])
    out = Path(cfg.out)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, tok_dir = encoder_for(cfg, "seq_cls", labels, texts, tmp)
        pad = model.config.pad_token_id
        ids, mask = encode_batch(tok, texts, min(cfg.max_length, model.config.max_position_embeddings), pad)
        steps = cfg.epochs * math.ceil(len(texts) / cfg.batch_size)
        if cfg.max_steps is not None:
            steps = min(steps, max(1, cfg.max_steps))
        losses = fit_encoder(model, ids, mask, cfg, steps, lambda logits, b, T: F.cross_entropy(logits, y[b]))
        save_encoder(model, out, tokenizer_dir=tok_dir)
    metrics: dict[str, Any] = {"labels": labels, "train_records": len(train_rows), "eval_records": len(eval_rows),
                               "steps": len(losses),
                               "final_train_loss": sum(losses[-5:]) / len(losses[-5:]),
                               "train_seconds": round(time.perf_counter() - t0, 2)}
    if eval_rows:
        metrics.update(evaluate_classifier(out, eval_rows, cfg.text_field, cfg.label_field))
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


class Classifier:
    """A trained classifier directory, loaded once: ``Classifier(dir).predict(texts)``."""

    def __init__(self, model_dir: str | Path, max_length: int | None = None):
        from lmstack.tokenizer import Tokenizer

        self.model = load_encoder(model_dir)
        if self.model.config.head != "seq_cls":
            raise ConfigError(f"{model_dir} is a {self.model.config.head} encoder, not a sequence classifier")
        self.tok = Tokenizer.from_dir(model_dir)
        self.max_length = min(max_length or 10**9, self.model.config.max_position_embeddings)

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = encode_batch(self.tok, texts[i:i + batch_size], self.max_length, self.model.config.pad_token_id)
            out.append(self.model(ids, mask).softmax(-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
        p = self.probabilities(list(texts), batch_size)
        names = self.model.config.id2label
        return [{"text": t, "label": names[int(i)], "score": round(float(s), 4)}
                for t, s, i in zip(texts, *p.max(-1))]


def predict_texts(model_dir: str | Path, texts: Sequence[str], file: str | Path | None = None,
                  text_field: str = "text") -> list[dict[str, Any]]:
    """Predictions for ``texts`` and, from ``file`` (JSON Lines), each record's ``text_field``."""
    texts = list(texts)
    if file is not None:
        p = Path(file)
        if not p.is_file():
            raise DataError(f"{p}: file not found")

        def bad(lineno: int, reason: str) -> None:
            raise DataError(f"{p}:{lineno}: {reason}")

        for lineno, r in iter_jsonl_lines(p, bad):
            if not isinstance(r, dict) or not isinstance(r.get(text_field), str):
                bad(lineno, f'expected an object with a string "{text_field}"')
            texts.append(r[text_field][:MAX_TEXT_CHARS])
    if not texts:
        raise DataError("no texts to classify: pass texts as arguments or --file")
    return Classifier(model_dir).predict(texts)


def evaluate_classifier(model_dir: str | Path, data: str | Path | list[dict[str, Any]], text_field: str = "text",
                        label_field: str = "label") -> dict[str, Any]:
    """Accuracy and macro-F1 (over the classifier's labels) on labelled records, overall and per ``lang``."""
    rows = read_labelled(data, text_field, label_field) if isinstance(data, (str, Path)) else data
    clf = Classifier(model_dir)
    pred = [p["label"] for p in clf.predict([r[text_field] for r in rows])]
    gold = [r[label_field] for r in rows]
    labels = list(clf.model.config.id2label.values())
    res: dict[str, Any] = {"accuracy": round(accuracy(gold, pred), 4), "macro_f1": round(macro_f1(gold, pred, labels), 4),
                           "n": len(rows)}
    langs = Counter(r.get("lang") for r in rows if r.get("lang"))
    for lang in sorted(langs):
        idx = [i for i, r in enumerate(rows) if r.get("lang") == lang]
        g, p = [gold[i] for i in idx], [pred[i] for i in idx]
        res[f"accuracy_{lang}"] = round(accuracy(g, p), 4)
        res[f"macro_f1_{lang}"] = round(macro_f1(g, p, labels), 4)
    return res
