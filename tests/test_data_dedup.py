"""MinHash signatures equal datasketch's; near dedup finds planted near-duplicates (EN word shingles, ZH
character shingles) with recall >= 0.9 at threshold 0.8 and keeps distinct documents; exact dedup on normalized
text; a sharded run plus merge keeps exactly the documents of an unsharded run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from lmstack.data.minhash import (exact_duplicates, exact_key, near_duplicates, optimal_bands, permutations,
                                  sha1_hash32, shingle_hashes, shingles, signature, text_signature)
from lmstack.data.pipeline import merge_output, run_pipeline

sys.path.insert(0, str(Path(__file__).parent / "data_fixtures"))
from gen import corpus  # noqa: E402


def _jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def test_signature_matches_datasketch():
    """Same shingle hashes -> the same signature as datasketch (affine32 scheme, its default)."""
    docs, _ = corpus(n_en=3, n_zh=2, n_dup_en=1, n_dup_zh=1)
    a, b = permutations(64, seed=7)
    for d in docs:
        sh = shingles(d)
        m = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=sha1_hash32)
        m.update_batch(sh)
        assert np.array_equal(signature(sh, a, b), m.hashvalues)
        hv = shingle_hashes(d)  # the pipeline's fast shingle hashes: one per distinct shingle
        assert len(hv) == len(sh)
        m = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=int)
        m.update_batch(hv.tolist())
        assert np.array_equal(text_signature(d, a, b), m.hashvalues)


def test_fast_signature_estimates_true_jaccard():
    docs, planted = corpus(seed=4, n_en=10, n_zh=10, n_dup_en=10, n_dup_zh=10)
    a, b = permutations(256, 1)
    errs = []
    for dup, orig in planted.items():
        est = np.mean(text_signature(docs[dup], a, b) == text_signature(docs[orig], a, b))
        errs.append(abs(est - _jaccard(shingles(docs[dup]), shingles(docs[orig]))))
    for i in range(5):  # unrelated documents: true Jaccard ~ 0
        errs.append(np.mean(text_signature(docs[i], a, b) == text_signature(docs[i + 1], a, b)))
    assert max(errs) < 0.12 and np.mean(errs) < 0.04


def test_shingles_words_vs_cjk_chars():
    assert shingles("The cat, the HAT!", ngram=2) and set(shingles("The cat, the HAT!", ngram=2)) == {
        b"the cat", b"cat the", b"the hat"}
    assert set(shingles("我们去公园", cjk_ngram=3)) == {"我们去".encode(), "们去公".encode(), "去公园".encode()}


def test_optimal_bands_match_datasketch():
    from datasketch.lsh import _optimal_param

    for t, p in ((0.8, 128), (0.5, 64), (0.9, 256)):
        assert optimal_bands(t, p) == _optimal_param(t, p, 0.5, 0.5)


def test_near_dedup_recall_and_distinct_kept():
    docs, planted = corpus(seed=1)
    a, b = permutations(128, 1)
    sigs = np.stack([text_signature(d, a, b) for d in docs])
    is_dup, pairs = near_duplicates(sigs, 0.8)
    true_sims = [_jaccard(shingles(docs[d]), shingles(docs[o])) for d, o in planted.items()]
    assert min(true_sims) > 0.8  # the plants really are near-duplicates at this threshold
    recall = np.mean([is_dup[d] for d in planted])
    assert recall >= 0.9
    assert not any(is_dup[i] for i in range(len(docs)) if i not in planted)  # distinct docs and originals kept
    for dup, kept, est in pairs:
        assert planted.get(dup) == kept and est >= 0.8


def test_exact_dedup_on_normalized_text():
    keys = np.array([exact_key(t) for t in ["Hello, World!", "hello world", "Hello World.", "other", "ＨＥＬＬＯ world"]],
                    dtype=np.uint64)
    assert exact_duplicates(keys).tolist() == [False, True, True, False, True]


def _write(path: Path, docs: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


def _cfg(inputs):
    return {"inputs": [{"path": str(p)} for p in inputs], "workers": 1,
            "normalize": {"enabled": False}, "language": {"enabled": False}, "quality": {"enabled": False},
            "pii": {"enabled": False}, "dedup": {"threshold": 0.8}}


@pytest.mark.parametrize("by_file", [True, False])
def test_sharded_run_equals_unsharded(tmp_path, by_file):
    docs, planted = corpus(seed=2, n_en=30, n_zh=20, n_dup_en=10, n_dup_zh=10)
    docs.append(docs[5])  # an exact duplicate
    if by_file:
        files = [tmp_path / f"part{k}.jsonl" for k in range(4)]
        for k, f in enumerate(files):
            _write(f, docs[k::4])
    else:
        files = [tmp_path / "all.jsonl"]
        _write(files[0], docs)
        with open(files[0], "a", encoding="utf-8") as f:
            f.write("{not json\n")
    cfg = _cfg(files)
    full = run_pipeline(cfg, tmp_path / "full")
    ids_full = [json.loads(x)["id"] for x in open(tmp_path / "full" / "data.jsonl", encoding="utf-8")]
    for i in range(3):
        summary = run_pipeline(cfg, tmp_path / "sharded", shard=f"{i}/3")
        assert summary["shard"] == [i, 3]
    merged = merge_output(cfg, tmp_path / "sharded")
    ids_sharded = [json.loads(x)["id"] for x in open(tmp_path / "sharded" / "data.jsonl", encoding="utf-8")]
    assert ids_sharded == ids_full and len(ids_full) == full["documents"] == merged["documents"]
    assert merged["read"]["problems"] == full["read"]["problems"] == ({} if by_file else {"malformed_json": 1})
    assert merged["read"]["records"] == full["read"]["records"] == len(docs)
    removed = {s["name"]: s["removed"] for s in full["steps"]}
    assert removed["exact_dedup"]["exact_duplicate"] == 1
    assert removed["near_dedup"]["near_duplicate"] >= 0.9 * len(planted)
    assert len(ids_full) <= len(docs) - 1 - int(0.9 * len(planted))


def test_merge_reports_missing_shard(tmp_path):
    from lmstack.errors import DataError

    docs, _ = corpus(n_en=5, n_zh=0, n_dup_en=0, n_dup_zh=0)
    _write(tmp_path / "a.jsonl", docs)
    run_pipeline(_cfg([tmp_path / "a.jsonl"]), tmp_path / "o", shard="0/2")
    with pytest.raises(DataError, match="missing shard outputs"):
        merge_output(_cfg([tmp_path / "a.jsonl"]), tmp_path / "o")


def test_lmstack_agrees_with_datasketch_lsh_loop():
    docs, planted = corpus(seed=3)
    a, b = permutations(128, 1)
    sigs = np.stack([signature(shingles(d), a, b) for d in docs])
    ours, _ = near_duplicates(sigs, 0.8)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    theirs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(shingles(d))
        hit = bool(lsh.query(m))
        theirs.append(hit)
        if not hit:
            lsh.insert(str(i), m)
    assert np.mean(ours == np.array(theirs)) >= 0.97
