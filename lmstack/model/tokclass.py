"""Token classification (NER / PII tagging) with the BERT-style encoder: ``lmstack classify train --task tokens``.

Records are JSON Lines ``{"tokens": [...], "tags": [...][, "split", "lang"]}`` with BIO tags (``B-PER``,
``I-PER``, ``O``; the shipped set ``lmstack/model/data/pii_ner.jsonl`` is PII-style EN + ZH: PER, LOC, ORG, EMAIL,
PHONE, Chinese tokenized by character). Each word (with a leading space, as it appears inside a sentence) is cut
into word pieces by the tokenizer; the word's tag is
trained on its first piece and the other pieces are ignored (-100), the usual alignment (Devlin et al. 2019,
section 5.3); a word's prediction is the tag at its first piece.

Scores are entity level, as CoNLL's conlleval and ``seqeval`` compute them (Tjong Kim Sang & De Meulder 2003):
an entity starts at ``B-X`` or at an ``I-X`` that does not continue an ``X`` entity, ends where the next tag does
not continue it, and counts as found only when type and span match exactly; precision / recall / F1 are micro
averages over entities, plus F1 per type.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError, DataError
from lmstack.model.encoder import IGNORE_INDEX, load_encoder, save_encoder
from lmstack.utils.io import atomic_write_json, iter_jsonl_lines

SHIPPED_NER = Path(__file__).with_name("data") / "pii_ner.jsonl"
MAX_DATA_BYTES = 256 << 20
MAX_WORDS = 2_000  # per record
MAX_WORD_CHARS = 200
_TAG = re.compile(r"^(O|[BI]-[^\s]+)$")


@dataclass
class TokenClassifyConfig:
    data: str = str(SHIPPED_NER)
    out: str = "runs/tagger"
    eval_data: str | None = None  # default: the records with "split": "test"
    init: str | None = None  # a local BERT / ModernBERT directory to fine-tune; default: a fresh small BERT
    vocab_size: int = 800
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 96
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("epochs", "batch_size", "max_length", "hidden_size", "num_hidden_layers"):
            if getattr(self, k) < 1:
                raise ConfigError(f"classify.{k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ConfigError(f"classify.lr must be > 0, got {self.lr}")


# ---------------------------------------------------------------------------------------------- data
def read_tagged(path: str | Path) -> list[dict[str, Any]]:
    """Records ``{"tokens": [str], "tags": [BIO str]}`` of equal length; anything else is refused by line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.stat().st_size > MAX_DATA_BYTES:
        raise DataError(f"{p}: larger than {MAX_DATA_BYTES >> 20} MiB; this trainer is for small tagged sets")

    def bad(lineno: int, reason: str) -> None:
        raise DataError(f"{p}:{lineno}: {reason}")

    rows = []
    for lineno, r in iter_jsonl_lines(p, bad):
        if not isinstance(r, dict):
            bad(lineno, 'expected an object {"tokens": [...], "tags": [...]}')
        toks, tags = r.get("tokens"), r.get("tags")
        if not (isinstance(toks, list) and isinstance(tags, list) and toks
                and all(isinstance(t, str) and t.strip() for t in toks) and all(isinstance(t, str) for t in tags)):
            bad(lineno, 'expected "tokens" (non-empty strings) and "tags" (strings) lists')
        if len(toks) != len(tags):
            bad(lineno, f"{len(toks)} tokens but {len(tags)} tags")
        if len(toks) > MAX_WORDS or any(len(t) > MAX_WORD_CHARS for t in toks):
            bad(lineno, f"more than {MAX_WORDS} tokens or a token longer than {MAX_WORD_CHARS} characters")
        for t in tags:
            if not _TAG.match(t):
                bad(lineno, f"tag {t!r} is not BIO (O, B-TYPE or I-TYPE)")
        rows.append(r)
    if not rows:
        raise DataError(f"{p}: no records")
    return rows


def split_words(text: str) -> list[str]:
    """Words of raw text for prediction: each CJK character alone (as the shipped set is tagged), other runs of
    non-space characters whole, with trailing punctuation split off (``"London."`` -> ``London``, ``.``)."""
    out = []
    for w in re.findall(r"[\u3400-\u9fff\u3000-\u303f\uff00-\uffef]|[^\s\u3400-\u9fff\u3000-\u303f\uff00-\uffef]+",
                        text):
        m = re.fullmatch(r"(.+?)([.,!?;:]+)", w)
        out += [m.group(1), *m.group(2)] if m and "@" not in m.group(1)[-1:] else [w]
    return out


def encode_words(tok, words: Sequence[Sequence[str]], max_length: int, pad_id: int, cls_id: int, sep_id: int,
                 tags: Sequence[Sequence[int]] | None = None):
    """(ids, mask, labels, first) (B, T): [CLS] pieces [SEP], right-padded; labels carry each word's tag id on its
    first piece and -100 elsewhere; ``first[b][i]`` is word i's first-piece position (-1 if truncated away)."""
    rows, labs, firsts = [], [], []
    for b, ws in enumerate(words):
        pieces = tok.encode_batch([" " + w for w in ws], add_special_tokens=False)  # as inside a sentence
        ids, lab, first = [cls_id], [IGNORE_INDEX], []
        for i, pc in enumerate(pieces):
            pc = pc or [tok.token_to_id("[UNK]") or 0]
            if len(ids) + len(pc) > max_length - 1:
                first += [-1] * (len(pieces) - i)
                break
            first.append(len(ids))
            lab += [tags[b][i] if tags is not None else IGNORE_INDEX] + [IGNORE_INDEX] * (len(pc) - 1)
            ids += pc
        rows.append(ids + [sep_id])
        labs.append(lab + [IGNORE_INDEX])
        firsts.append(first)
    T = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    lab_t = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labs)):
        ids_t[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        lab_t[i, :len(lb)] = torch.tensor(lb)
    return ids_t, mask, lab_t, firsts


# ---------------------------------------------------------------------------------------------- metrics
def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end exclusive) of the entities in one BIO sequence, by conlleval's chunk rules."""
    out, start, typ = [], None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, ty = t.partition("-")
        continues = prefix == "I" and typ == ty and start is not None
        if start is not None and not continues:
            out.append((typ, start, i))
            start, typ = None, None
        if prefix in ("B", "I") and not continues:
            start, typ = i, ty
    return out


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Micro precision / recall / F1 over exact (type, span) entity matches; F1 and support per type."""
    tp, n_pred, n_gold = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred, strict=True):
        ge, pe = set(entities(g)), set(entities(p))
        for e in ge:
            n_gold[e[0]] += 1
        for e in pe:
            n_pred[e[0]] += 1
        for e in ge & pe:
            tp[e[0]] += 1

    def prf(t: int, np_: int, ng: int) -> tuple[float, float, float]:
        pr = t / np_ if np_ else 0.0
        rc = t / ng if ng else 0.0
        return pr, rc, (2 * pr * rc / (pr + rc) if pr + rc else 0.0)

    p, r, f = prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    per = {ty: {"f1": round(prf(tp[ty], n_pred[ty], n_gold[ty])[2], 4), "support": n_gold[ty]}
           for ty in sorted(set(n_gold) | set(n_pred))}
    return {"precision": p, "recall": r, "f1": f, "per_type": per}


# ---------------------------------------------------------------------------------------------- model use
class Tagger:
    """A trained token-classification directory: ``Tagger(dir).tag([["Alice", "lives", ...]])``."""

    def __init__(self, model_dir: str | Path, max_length: int | None = None):
        from lmstack.tokenizer import Tokenizer

        self.model = load_encoder(model_dir)
        if self.model.config.head != "tok_cls":
            raise ConfigError(f"{model_dir} is a {self.model.config.head} encoder, not a token classifier")
        self.tok = Tokenizer.from_dir(model_dir)
        self.max_length = min(max_length or 512, self.model.config.max_position_embeddings)
        self.cls_id, self.sep_id = _special(self.tok, "[CLS]"), _special(self.tok, "[SEP]")

    @torch.no_grad()
    def tag(self, words: Sequence[Sequence[str]], batch_size: int = 32) -> list[list[str]]:
        names = self.model.config.id2label
        out: list[list[str]] = []
        for i in range(0, len(words), batch_size):
            chunk = words[i:i + batch_size]
            ids, mask, _, first = encode_words(self.tok, chunk, self.max_length, self.model.config.pad_token_id,
                                               self.cls_id, self.sep_id)
            best = self.model(ids, mask).argmax(-1)
            for b, fs in enumerate(first):
                out.append([names[int(best[b, j])] if j >= 0 else "O" for j in fs])
        return out


def _special(tok, name: str) -> int:
    i = tok.token_to_id(name)
    if i is None:
        raise ConfigError(f"the tokenizer has no {name} token; a token classifier needs BERT's special tokens")
    return i


def evaluate_tagger(model_dir: str | Path, data: str | Path | list[dict[str, Any]]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 (overall, per type, per ``lang``) and token accuracy."""
    rows = read_tagged(data) if isinstance(data, (str, Path)) else data
    pred = Tagger(model_dir).tag([r["tokens"] for r in rows])
    gold = [r["tags"] for r in rows]
    s = entity_scores(gold, pred)
    flat = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    res: dict[str, Any] = {"precision": round(s["precision"], 4), "recall": round(s["recall"], 4),
                           "f1": round(s["f1"], 4), "token_accuracy": round(sum(g == p for g, p in flat) / len(flat), 4),
                           "n": len(rows), "per_type": s["per_type"]}
    for lang in sorted({r.get("lang") for r in rows if r.get("lang")}):
        idx = [i for i, r in enumerate(rows) if r.get("lang") == lang]
        res[f"f1_{lang}"] = round(entity_scores([gold[i] for i in idx], [pred[i] for i in idx])["f1"], 4)
    return res


def tag_texts(model_dir: str | Path, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Raw texts -> words (:func:`split_words`) -> tags; one ``{text, entities: [{type, text}]}`` per text."""
    if not texts:
        raise DataError("no texts to tag: pass texts as arguments")
    words = [split_words(t) for t in texts]
    out = []
    for text, ws, tags in zip(texts, words, Tagger(model_dir).tag(words)):
        joiner = "" if any("\u3400" <= ch <= "\u9fff" for ch in text) else " "
        out.append({"text": text, "entities": [{"type": ty, "text": joiner.join(ws[a:b])}
                                               for ty, a, b in entities(tags)]})
    return out


# ---------------------------------------------------------------------------------------------- training
def train_tagger(cfg: TokenClassifyConfig) -> dict[str, Any]:
    """Train (setup -> loop -> save) and return the metrics written to ``OUT/metrics.json``."""
    from lmstack.model.classify import encoder_for, fit_encoder

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rows = read_tagged(cfg.data)
    if cfg.eval_data:
        train_rows, eval_rows = rows, read_tagged(cfg.eval_data)
    else:
        train_rows = [r for r in rows if r.get("split", "train") != "test"]
        eval_rows = [r for r in rows if r.get("split") == "test"]
    if not train_rows:
        raise DataError(f"{cfg.data}: no training records (every record has split=test)")
    types = sorted({t[2:] for r in train_rows for t in r["tags"] if t != "O"})
    if not types:
        raise DataError(f"{cfg.data}: no entity tags (B-/I-) in the training records")
    labels = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    unknown = sorted({t for r in eval_rows for t in r["tags"]} - set(labels))
    if unknown:
        raise DataError(f"{cfg.eval_data or cfg.data}: held-out tags {unknown} never occur in training")
    lab2id = {lab: i for i, lab in enumerate(labels)}
    words = [r["tokens"] for r in train_rows]
    y = [[lab2id[t] for t in r["tags"]] for r in train_rows]
    out = Path(cfg.out)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, tok_dir = encoder_for(cfg, "tok_cls", labels, [" ".join(w) for w in words], tmp)
        max_len = min(cfg.max_length, model.config.max_position_embeddings)
        ids, mask, lab, _ = encode_words(tok, words, max_len, model.config.pad_token_id, _special(tok, "[CLS]"),
                                         _special(tok, "[SEP]"), y)
        steps = cfg.epochs * math.ceil(len(words) / cfg.batch_size)
        losses = fit_encoder(model, ids, mask, cfg, steps, lambda logits, b, T: F.cross_entropy(
            logits.flatten(0, 1), lab[b, :T].flatten(), ignore_index=IGNORE_INDEX))
        save_encoder(model, out, tokenizer_dir=tok_dir)
    metrics: dict[str, Any] = {"labels": labels, "train_records": len(train_rows), "eval_records": len(eval_rows),
                               "final_train_loss": sum(losses[-5:]) / len(losses[-5:]),
                               "train_seconds": round(time.perf_counter() - t0, 2)}
    if eval_rows:
        metrics.update(evaluate_tagger(out, eval_rows))
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


__all__ = ["TokenClassifyConfig", "train_tagger", "evaluate_tagger", "tag_texts", "Tagger", "entities",
           "entity_scores", "read_tagged", "split_words", "SHIPPED_NER"]
