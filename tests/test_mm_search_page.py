"""`lmstack clip serve`: the image search page in headless Chromium (Playwright driving Debian's chromium, as the
web-chat test does): an English and a Chinese query each show the top images in the order of the model's cosine
similarities (recomputed here from the images and the query), every image loads; the JSON API refuses bad input
with 4xx and serves only indexed files."""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch

from tests.serve_fixtures import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOT = os.environ.get("LMSTACK_SCREENSHOT_DIR")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import uvicorn

    from lmstack.mm.clip import ClipConfig
    from lmstack.mm.shapes import write_dataset
    from lmstack.mm.train import ClipTrainConfig, train_clip
    from lmstack.serve.image_search import ImageIndex, create_image_search_app

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("clipserve")
    tiny = ClipConfig(channels=(8, 16), embed_dim=16, text_hidden=16, text_layers=1, text_heads=2,
                      text_intermediate=32, max_length=24)
    train_clip(ClipTrainConfig(out=str(root / "run"), train_pairs=64, steps=3, batch_size=16, langs=("en", "zh"),
                               model=replace(tiny)))
    write_dataset(root / "set", 12, seed=3, size=32)
    index = ImageIndex(root / "run", [str(root / "set" / "images")])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_image_search_app(index), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", root, index
    server.should_exit = True
    th.join(timeout=30)


def _expected(root, query, k):
    """The ranking recomputed from the image files and the model, not from the server's index."""
    from lmstack.mm.train import ClipRunner, load_image

    files = sorted((root / "set" / "images").glob("*.png"))
    run = ClipRunner(root / "run")
    s = (run.embed_images(np.stack([load_image(f, 32) for f in files])) @ run.embed_texts([query])[0]).numpy()
    order = np.argsort(-s, kind="stable")[:k]
    return [files[i].name for i in order], s[order]


def test_page_in_chromium(setup):
    from playwright.sync_api import sync_playwright

    url, root, _ = setup
    assert os.path.exists(CHROMIUM), "install the system package: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = b.new_page(viewport={"width": 1100, "height": 700})
        pg.set_default_timeout(60_000)
        pg.goto(url + "/")
        assert "12 images indexed" in pg.locator("#status").inner_text()
        for query in ("a red circle at the top left", "左上方的红色圆形"):
            pg.fill("#q", query)
            pg.press("#q", "Enter")
            pg.wait_for_function("document.body.dataset.busy === '0' && document.querySelectorAll('figure.hit').length")
            names = pg.locator("figure.hit img").evaluate_all("(xs) => xs.map((x) => x.alt)")
            caps = pg.locator("figure.hit figcaption").all_inner_texts()
            want, scores = _expected(root, query, 8)
            assert names == want
            np.testing.assert_allclose([float(c.split()[-1]) for c in caps], scores, atol=2e-3)
            pg.wait_for_function("[...document.querySelectorAll('figure.hit img')].every((i) => i.complete)")
            assert pg.locator("figure.hit img").evaluate_all("(xs) => xs.map((x) => x.naturalWidth)") == [32] * 8
            assert query in pg.locator("#status").inner_text()
        if SHOT:
            pg.screenshot(path=os.path.join(SHOT, "clip_search.png"), full_page=True)
        pg.select_option("#k", "4")
        pg.press("#q", "Enter")
        pg.wait_for_function("document.querySelectorAll('figure.hit').length === 4")
        b.close()


def test_api_refuses_bad_input_and_serves_only_indexed_files(setup):
    url, _, index = setup
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/api/search", params={"q": "blue square", "k": 3})
        assert r.status_code == 200 and [h["name"] for h in r.json()["results"]] == \
            [h["name"] for h in index.search("blue square", 3)]
        assert c.get("/api/search", params={"q": "  "}).status_code == 400
        assert c.get("/api/search", params={"q": "x", "k": 101}).status_code == 422
        assert c.get("/api/search", params={"q": "x" * 1001}).status_code == 422
        assert c.get("/images/12").status_code == 404 and c.get("/images/-1").status_code == 404
        assert c.get("/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
        assert c.get("/images/0").content == index.files[0].read_bytes()
