"""``lmstack clip data|train|eval|embed|search|serve``: the CLIP-style image--text model (lmstack.mm); each verb parses
its arguments and calls one library function."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

clip_app = typer.Typer(help="Image-text contrastive model (CLIP-style) on synthetic shapes: train, eval, embed, "
                            "search.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(clip_app, name="clip")


@clip_app.command("data")
def data_cmd(out: str = typer.Option(..., "--out", "-o", help="Directory for images/ and captions.jsonl."),
             n: int = typer.Option(200, "--n", help="Number of image-caption pairs."),
             seed: int = typer.Option(0, "--seed"), size: int = typer.Option(32, "--size")) -> None:
    """Write the synthetic CC0 image-caption set (PNG + captions.jsonl, EN and ZH captions)."""
    from lmstack.errors import ConfigError
    from lmstack.mm.shapes import write_dataset

    if not 1 <= n <= 1_000_000 or not 8 <= size <= 512:
        raise ConfigError("--n must be in 1..1000000 and --size in 8..512")
    typer.echo(str(write_dataset(out, n, seed, size)))


@clip_app.command("train")
def train_cmd(out: str = typer.Option("runs/clip", "--out", "-o"),
              steps: int = typer.Option(300, "--steps"), batch_size: int = typer.Option(64, "--batch-size"),
              train_pairs: int = typer.Option(2000, "--train-pairs"), lr: float = typer.Option(2e-3, "--lr"),
              lang: str = typer.Option("en,zh", "--lang", help="Caption languages: en, zh or both."),
              seed: int = typer.Option(0, "--seed")) -> None:
    """Train on rendered pairs; writes OUT (config.json, model.safetensors, tokenizer, metrics.json)."""
    from lmstack.mm.train import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(out=out, steps=steps, batch_size=batch_size, train_pairs=train_pairs, lr=lr, seed=seed,
                          langs=tuple(x.strip() for x in lang.split(",") if x.strip()))
    typer.echo(json.dumps(train_clip(cfg), ensure_ascii=False))


@clip_app.command("eval")
def eval_cmd(model_dir: str = typer.Argument(...), seed: int = typer.Option(1, "--seed"),
             lang: str = typer.Option("en,zh", "--lang")) -> None:
    """Recall@k (image->text, text->image) and zero-shot accuracy on freshly rendered held-out pairs."""
    from lmstack.mm.train import evaluate_clip

    typer.echo(json.dumps(evaluate_clip(model_dir, seed=seed, langs=[x for x in lang.split(",") if x]),
                          ensure_ascii=False))


@clip_app.command("embed")
def embed_cmd(model_dir: str = typer.Argument(...), images: List[str] = typer.Argument(..., help="Files or dirs."),
              out: str = typer.Option(..., "--out", "-o", help="Index directory (embeddings.npy + images.json).")
              ) -> None:
    """Embed image files into a searchable index."""
    from lmstack.mm.train import embed_images_to_index

    typer.echo(json.dumps(embed_images_to_index(model_dir, images, out)))


@clip_app.command("search")
def search_cmd(model_dir: str = typer.Argument(...), index: str = typer.Argument(...),
               query: str = typer.Argument(..., help='e.g. "a red circle at the top left" or "左上方的红色圆形"'),
               k: int = typer.Option(5, "--k"),
               html: Optional[str] = typer.Option(None, "--html", help="Also write a results page here.")) -> None:
    """The k indexed images closest to a text query (one JSON line each)."""
    from lmstack.mm.train import search, search_page
    from lmstack.utils.io import atomic_write_text

    res = search(model_dir, index, query, k)
    for r in res:
        typer.echo(json.dumps(r, ensure_ascii=False))
    if html:
        atomic_write_text(html, search_page(res, query))


@clip_app.command("serve")
def serve_cmd(model: str = typer.Option(..., "--model", "-m", help="A `lmstack clip train` directory."),
              images: List[str] = typer.Option([], "--images", help="Image files or directories to search."),
              index: Optional[str] = typer.Option(None, "--index", help="Or an index from `lmstack clip embed`."),
              host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8010, "--port")) -> None:
    """An image search page: a text query (EN or ZH) returns the closest images (http://HOST:PORT/)."""
    from lmstack.serve.image_search import serve_image_search

    serve_image_search(model, images, index, host, port)
