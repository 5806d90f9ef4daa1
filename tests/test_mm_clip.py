"""lmstack.mm: the symmetric InfoNCE loss against a float64 per-row loop and transformers' CLIP loss, recall@k
against a sort-based count, the synthetic renderer against its captions (colour and position read back from
the pixels), a tiny training run that learns (loss falls, held-out recall beats chance), save/load, and the
``lmstack clip`` verbs end to end (embed -> search, one-line errors)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmstack.mm import shapes
from lmstack.mm.clip import Clip, ClipConfig, clip_loss, images_to_tensor, load_clip, recall_at_k, save_clip

TINY = ClipConfig(channels=(8, 16), embed_dim=16, text_hidden=16, text_layers=1, text_heads=2,
                  text_intermediate=32, max_length=24)


def _loop_loss(logits: np.ndarray) -> float:
    """Mean over rows and over columns of -log softmax at the diagonal, one row at a time in float64."""
    n = logits.shape[0]

    def nll(rows: np.ndarray) -> float:
        total = 0.0
        for i in range(n):
            m = max(rows[i])
            lse = m + math.log(sum(math.exp(v - m) for v in rows[i]))
            total += lse - rows[i][i]
        return total / n

    return (nll(logits) + nll(logits.T)) / 2


@pytest.mark.parametrize("n", [1, 3, 17])
def test_clip_loss_matches_reference_loop_and_transformers(n):
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    g = torch.Generator().manual_seed(n)
    img = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    logits = 14.3 * img @ txt.T
    ours = clip_loss(logits)
    assert ours.item() == pytest.approx(_loop_loss(logits.double().numpy()), rel=1e-5, abs=1e-6)
    # transformers takes logits_per_text (= logits_per_image.T); the loss is symmetric, so both agree
    torch.testing.assert_close(ours, image_text_contrastive_loss(logits.T))


def test_learned_temperature_gets_a_gradient_and_is_clamped():
    model = Clip(TINY)
    imgs, items = shapes.make_pairs(4, seed=0)
    ids = torch.randint(5, 50, (4, 6))
    loss = clip_loss(model(images_to_tensor(imgs), ids, torch.ones_like(ids)))
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100: clamped to 100
        x = images_to_tensor(imgs)
        sim = model.encode_image(x) @ model.encode_text(ids, torch.ones_like(ids)).T
        torch.testing.assert_close(model(x, ids, torch.ones_like(ids)), 100 * sim)


def test_recall_at_k_matches_sorting():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        sim = rng.integers(0, 5, size=(n, n)).astype(np.float32)  # many ties: a tie counts against the right answer
        got = recall_at_k(torch.from_numpy(sim), (1, 3))
        for k in (1, 3):
            hits = 0
            for i in range(n):
                order = sorted(range(n), key=lambda j: (-sim[i, j], j == i))  # ties: the right one last
                hits += order.index(i) < k
            assert got[f"R@{k}"] == pytest.approx(hits / n)


def test_rendered_pixels_match_the_caption():
    rng = random.Random(3)
    for it in rng.sample(shapes.all_items(("en",)), 40):
        im = shapes.render(it, 32, random.Random(rng.random())).astype(int)
        rgb = np.array(shapes.COLOURS[it.colour][0])
        ink = np.abs(im - rgb).sum(-1) < 60  # pixels of the named colour
        assert ink.sum() >= 6, it
        ys, xs = np.nonzero(ink)
        want_x, want_y = shapes.POSITIONS[it.position][0]
        assert (xs.mean() / 32 < 0.5) == (want_x < 0.5) and (ys.mean() / 32 < 0.5) == (want_y < 0.5), it
    assert shapes.caption("red", "circle", "top left", "en") == "a red circle at the top left"
    assert shapes.caption("blue", "7", "bottom right", "zh") == "右下方的蓝色数字7"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dataclasses import replace

    from lmstack.mm.train import ClipTrainConfig, train_clip

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("clip") / "run"
    cfg = ClipTrainConfig(out=str(out), train_pairs=400, steps=60, batch_size=32, lr=3e-3, langs=("en",),
                          model=replace(TINY))
    return out, train_clip(cfg)


def test_training_learns_and_beats_chance(tiny_run):
    out, m = tiny_run
    assert m["final_train_loss"] < m["first_loss"] - 0.5
    n = m["heldout_pairs_en"]
    assert n == len(shapes.COLOURS) * len(shapes.OBJECTS) * len(shapes.POSITIONS)
    assert m["t2i_R@10_en"] > 3 * 10 / n and m["i2t_R@10_en"] > 3 * 10 / n  # chance is 10/n
    for attr in ("colour", "object", "position"):  # 60 tiny steps do not reach far above chance: only range-checked
        assert 0 <= m[f"zero_shot_{attr}_en"] <= 1
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["t2i_R@1_en"] == m["t2i_R@1_en"]


def test_save_load_round_trip_is_exact(tiny_run, tmp_path):
    out, _ = tiny_run
    model = load_clip(out)
    imgs, items = shapes.make_pairs(5, seed=9)
    x = images_to_tensor(imgs)
    save_clip(model, tmp_path / "copy", out)
    again = load_clip(tmp_path / "copy")
    torch.testing.assert_close(model.encode_image(x), again.encode_image(x), rtol=0, atol=0)
    (tmp_path / "copy" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    from lmstack.errors import CheckpointError
    with pytest.raises(CheckpointError, match="not an lmstack CLIP config"):
        load_clip(tmp_path / "copy")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmstack.cli", "clip", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_embed_search_and_page(tiny_run, tmp_path):
    out, _ = tiny_run
    r = _cli("data", "--out", str(tmp_path / "set"), "--n", "24", "--seed", "5")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "set" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all((tmp_path / "set" / x["image"]).is_file() for x in rows)
    r = _cli("embed", str(out), str(tmp_path / "set" / "images"), "--out", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images"] == 24
    q = rows[0]["caption"]
    r = _cli("search", str(out), str(tmp_path / "idx"), q, "--k", "24", "--html", str(tmp_path / "p.html"))
    assert r.returncode == 0, r.stderr
    hits = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(hits) == 24 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # the scores are the model's cosine similarities: recompute them directly
    from lmstack.mm.train import ClipRunner, load_image
    from pathlib import Path
    run = ClipRunner(out)
    e = run.embed_images(np.stack([load_image(Path(h["image"]), 32) for h in hits])) @ run.embed_texts([q])[0]
    np.testing.assert_allclose([h["score"] for h in hits], e.numpy(), atol=2e-4)
    assert "data:image/png;base64," in (tmp_path / "p.html").read_text()


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    out, _ = tiny_run
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for args in (["embed", str(out), str(tmp_path / "bad.png"), "--out", str(tmp_path / "i")],
                 ["search", str(out), str(tmp_path), "red"]):
        r = _cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("lmstack: "), r.stderr
    from lmstack.errors import ConfigError
    from lmstack.mm.train import ClipTrainConfig
    with pytest.raises(ConfigError, match="needs negatives"):
        ClipTrainConfig(batch_size=1)
