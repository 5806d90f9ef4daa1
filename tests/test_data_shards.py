"""Token shards: contents equal an independent ``tokenizers`` encoding, EOS after each document, val split by
document and deterministic, dtype by vocab size, shard roll-over at document boundaries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lmstack.data.shards import open_split, read_index, write_shards
from lmstack.errors import DataError

FIX = Path(__file__).parent / "data_fixtures"


def _docs():
    out = []
    for name in ("good_en.txt", "good_zh.txt"):
        out += [d.strip() for d in (FIX / name).read_text(encoding="utf-8").split("=====\n") if d.strip()]
    # split into sentences to get more, shorter documents
    return [s for d in out for s in d.replace("。", "。\n").replace(". ", ".\n").split("\n") if s.strip()]


class HFTok:
    """The Tokenizer contract over a raw ``tokenizers`` byte-level BPE (independent of lmstack.tokenizer)."""

    def __init__(self, offset: int = 0):
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(_docs(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        self.tok, self.offset = tok, offset
        self.eos_token_id = tok.token_to_id("<eos>") + offset
        self.vocab_size = tok.get_vocab_size() + offset
        self.sha256 = hashlib.sha256(tok.to_str().encode()).hexdigest()

    def encode_batch(self, texts):
        return [[i + self.offset for i in e.ids] for e in self.tok.encode_batch(list(texts))]


@pytest.fixture(scope="module")
def tok():
    return HFTok()


def _split_docs(arr: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in arr.tolist():
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == [], "a shard must end with EOS"
    return docs


def test_shards_match_reference_encoding(tmp_path, tok):
    docs = _docs()
    ref = [tuple(e.ids) for e in tok.tok.encode_batch(docs)]
    index = write_shards(iter(docs), tok, tmp_path / "s", val_fraction=0.2, seed=3, shard_tokens=300,
                         sources=[{"path": "x.jsonl", "sha256": "0", "documents": len(docs)}])
    on_disk = json.loads((tmp_path / "s" / "index.json").read_text())
    assert on_disk == index == read_index(tmp_path / "s")
    assert index["format"] == "lmstack-shards-v1" and index["dtype"] == "uint16"
    assert index["vocab_size"] == tok.vocab_size and index["eos_token_id"] == tok.eos_token_id
    assert index["tokenizer_sha256"] == tok.sha256 and index["sources"][0]["documents"] == len(docs)
    train = [d for a in open_split(tmp_path / "s", "train") for d in _split_docs(np.asarray(a), tok.eos_token_id)]
    val = [d for a in open_split(tmp_path / "s", "val") for d in _split_docs(np.asarray(a), tok.eos_token_id)]
    assert len(train) + len(val) == len(ref) and val and train
    assert sorted(train + val) == sorted(ref)
    # train keeps stream order (val is a subsequence removed)
    it = iter(ref)
    assert all(any(d == r for r in it) for d in train)
    # multiple files, each under the limit unless a single document is larger, counts consistent
    files = index["splits"]["train"]["files"]
    assert len(files) > 1
    for f in files:
        arr = np.fromfile(tmp_path / "s" / f["path"], dtype=np.uint16)
        assert len(arr) == f["tokens"] and arr[-1] == tok.eos_token_id
        assert f["tokens"] <= 300 or f["documents"] == 1
        assert f["documents"] == int((arr == tok.eos_token_id).sum())
    assert index["splits"]["train"]["tokens"] == sum(f["tokens"] for f in files)
    assert index["splits"]["train"]["documents"] == len(train)


def test_val_split_deterministic_from_seed(tmp_path, tok):
    docs = _docs()
    a = write_shards(docs, tok, tmp_path / "a", val_fraction=0.3, seed=1)
    b = write_shards(docs, tok, tmp_path / "b", val_fraction=0.3, seed=1)
    c = write_shards(docs, tok, tmp_path / "c", val_fraction=0.3, seed=2)
    va = np.fromfile(tmp_path / "a" / "val_00000.bin", dtype=np.uint16)
    assert np.array_equal(va, np.fromfile(tmp_path / "b" / "val_00000.bin", dtype=np.uint16))
    assert a["splits"] == b["splits"]
    assert not np.array_equal(va, np.fromfile(tmp_path / "c" / "val_00000.bin", dtype=np.uint16))
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == len(docs)
    assert c["splits"]["train"]["documents"] + c["splits"]["val"]["documents"] == len(docs)


def test_val_documents_exact_and_uint32(tmp_path):
    big = HFTok(offset=70_000)
    docs = _docs()
    index = write_shards(docs, big, tmp_path / "s", val_documents=5, seed=0)
    assert index["dtype"] == "uint32" and index["splits"]["val"]["documents"] == 5
    assert index["splits"]["train"]["documents"] == len(docs) - 5
    arr = np.asarray(open_split(tmp_path / "s", "val")[0])
    assert arr.dtype == np.uint32 and arr.max() >= 70_000
    ref = sorted(tuple(i + 70_000 for i in e.ids) for e in big.tok.encode_batch(docs))
    got = _split_docs(arr, big.eos_token_id) + _split_docs(np.asarray(open_split(tmp_path / "s")[0]), big.eos_token_id)
    assert sorted(got) == ref


def test_bad_inputs(tmp_path, tok):
    with pytest.raises(DataError, match="no documents"):
        write_shards([], tok, tmp_path / "e")
    assert not (tmp_path / "e").exists()  # atomic: nothing left behind
    with pytest.raises(DataError, match="no index.json"):
        read_index(tmp_path)
    write_shards(_docs(), tok, tmp_path / "s")
    p = tmp_path / "s" / "train_00000.bin"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(DataError, match="does not match"):
        open_split(tmp_path / "s", "train")
