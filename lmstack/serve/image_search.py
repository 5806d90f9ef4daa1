"""Image search page for a CLIP model (``lmstack clip serve --model DIR --images DIR``): a text query, English or
Chinese, returns the indexed images closest to it by cosine similarity of the model's unit embeddings.

``GET /`` the page (one HTML file, no external assets); ``GET /api/search?q=...&k=...`` the ranking as JSON
``{"query", "results": [{"id", "name", "score"}]}``; ``GET /images/{id}`` an indexed image's bytes (only files of
the index, by position: no path from the client ever reaches the file system). Queries are capped at 1,000
characters and ``k`` at 100; the images are embedded once at start (or read from a ``lmstack clip embed`` index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmstack.errors import ConfigError, DataError

MAX_QUERY_CHARS = 1000
MAX_K = 100


class ImageIndex:
    """A CLIP model and the unit embeddings (N, D) of the images it searches."""

    def __init__(self, model_dir: str | Path, images: Sequence[str] = (), index: str | Path | None = None):
        from lmstack.mm.train import ClipRunner, _image_files, load_image

        if bool(images) == (index is not None):
            raise ConfigError("give the images to search (--images DIR) or an index (--index DIR), one of them")
        self.runner = ClipRunner(model_dir)
        if index is not None:
            idx = Path(index)
            if not (idx / "embeddings.npy").is_file() or not (idx / "images.json").is_file():
                raise DataError(f"{idx}: not an image index (make one with `lmstack clip embed MODEL IMAGES --out DIR`)")
            self.emb = np.load(idx / "embeddings.npy", allow_pickle=False)
            self.files = [Path(p) for p in json.loads((idx / "images.json").read_text())["images"]]
            if self.emb.ndim != 2 or len(self.files) != len(self.emb):
                raise DataError(f"{idx}: embeddings.npy and images.json disagree")
        else:
            self.files = _image_files(list(images))
            size = self.runner.model.config.image_size
            self.emb = self.runner.embed_images(np.stack([load_image(f, size) for f in self.files])).numpy()

    def search(self, query: str, k: int = 8) -> list[dict[str, Any]]:
        if not query.strip():
            raise DataError("empty search query")
        q = self.runner.embed_texts([query[:MAX_QUERY_CHARS]]).numpy()[0]
        if q.shape[0] != self.emb.shape[1]:
            raise DataError(f"the index has dimension {self.emb.shape[1]}, the model {q.shape[0]} (another model?)")
        scores = self.emb @ q
        top = np.argsort(-scores, kind="stable")[:max(1, min(k, MAX_K))]
        return [{"id": int(i), "name": self.files[i].name, "score": round(float(scores[i]), 4)} for i in top]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmstack image search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }
 form { display: flex; gap: 8px; margin-bottom: 16px; }
 #q { flex: 1; font-size: 16px; padding: 8px; } button { font-size: 16px; padding: 8px 16px; }
 #results { display: flex; flex-wrap: wrap; gap: 12px; }
 figure.hit { margin: 0; background: #fff; border: 1px solid #ddd; padding: 6px; text-align: center; }
 figure.hit img { width: 128px; height: 128px; image-rendering: pixelated; display: block; }
 figcaption { font-size: 12px; margin-top: 4px; } #status { color: #666; margin-bottom: 8px; }
</style></head><body>
<h1>Image search</h1>
<form id="form"><input id="q" placeholder="a red circle at the top left / 左上方的红色圆形" autofocus>
<select id="k"><option>4</option><option selected>8</option><option>16</option></select>
<button id="go" type="submit">Search</button></form>
<div id="status">__COUNT__ images indexed</div><div id="results"></div>
<script>
const form = document.getElementById('form'), results = document.getElementById('results'),
      status = document.getElementById('status');
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const q = document.getElementById('q').value.trim(), k = document.getElementById('k').value;
  if (!q) return;
  document.body.dataset.busy = '1';
  const r = await fetch('api/search?q=' + encodeURIComponent(q) + '&k=' + k);
  const body = await r.json();
  results.replaceChildren();
  if (!r.ok) { status.textContent = body.detail || 'error'; document.body.dataset.busy = '0'; return; }
  status.textContent = body.results.length + ' results for "' + body.query + '"';
  for (const h of body.results) {
    const fig = document.createElement('figure'); fig.className = 'hit'; fig.dataset.id = h.id;
    const img = document.createElement('img'); img.src = 'images/' + h.id; img.alt = h.name;
    const cap = document.createElement('figcaption'); cap.textContent = h.name + ' ' + h.score.toFixed(3);
    fig.append(img, cap); results.append(fig);
  }
  document.body.dataset.busy = '0';
});
</script></body></html>
"""


def create_image_search_app(index: ImageIndex):
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse

    app = FastAPI(title="lmstack image search")
    page = PAGE.replace("__COUNT__", str(len(index.files)))

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/search")
    def api_search(q: str = Query(..., max_length=MAX_QUERY_CHARS), k: int = Query(8, ge=1, le=MAX_K)):
        try:
            return {"query": q, "results": index.search(q, k)}
        except DataError as e:
            raise HTTPException(400, str(e)) from None

    @app.get("/images/{image_id}")
    def image(image_id: int):
        if not 0 <= image_id < len(index.files):
            raise HTTPException(404, "no such image")
        return FileResponse(index.files[image_id])

    return app


def serve_image_search(model_dir: str | Path, images: Sequence[str] = (), index: str | Path | None = None,
                       host: str = "127.0.0.1", port: int = 8010) -> None:
    import uvicorn

    app = create_image_search_app(ImageIndex(model_dir, images, index))
    uvicorn.run(app, host=host, port=port, log_level="warning")
