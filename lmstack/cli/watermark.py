"""``lmstack watermark detect``: is this text watermarked (lmstack.guard.watermark, Kirchenbauer et al. 2023)?
Prints the z-score and the one-sided p-value as JSON. ``lmstack guard watermark-detect`` is the same command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

watermark_app = typer.Typer(help="Green-list generation watermark: detect it in text (docs/guard.md).",
                            no_args_is_help=True)
MAX_TEXT_BYTES = 8 << 20


def register(app: typer.Typer) -> None:
    app.add_typer(watermark_app, name="watermark")


def _vocab_size(model_dir: str, tok) -> int:
    """The model's embedding rows (what the server's green lists are drawn over): config.json's vocab_size,
    else the tokenizer's."""
    cfg = Path(model_dir) / "config.json"
    if cfg.is_file() and cfg.stat().st_size < (1 << 20):
        try:
            v = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size")
            if isinstance(v, int) and v > 1:
                return v
        except (ValueError, AttributeError):
            pass
    return tok.vocab_size


def run_detect(text: Optional[str], model: Optional[str], ids: Optional[str], vocab_size: Optional[int],
               gamma: float, key: int, z_threshold: float, context_width: int, scheme: str,
               ignore_repeated: bool) -> dict:
    from lmstack.errors import ConfigError, DataError
    from lmstack.guard.watermark import check_params, detect, false_positive_rate

    try:
        check_params(gamma, 0.0, context_width, scheme)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if ids is not None:
        try:
            toks = [int(x) for x in ids.replace(" ", "").split(",") if x][:1_000_000]
        except ValueError:
            raise typer.BadParameter("comma-separated integers", param_hint="--ids") from None
        if vocab_size is None:
            raise ConfigError("--ids needs --vocab-size")
    elif text is not None and model is not None:
        from lmstack.tokenizer import Tokenizer

        p = Path(text)
        if len(text) < 4096 and "\n" not in text and p.is_file():  # TEXT|FILE: an existing file is read
            if p.stat().st_size > MAX_TEXT_BYTES:
                raise DataError(f"{p}: over {MAX_TEXT_BYTES >> 20} MiB; detect on a part of it")
            text = p.read_text(encoding="utf-8", errors="replace")
        if not Path(model).is_dir():
            raise DataError(f"{model}: model directory not found")
        tok = Tokenizer.from_dir(model)
        toks = tok.encode(text[:MAX_TEXT_BYTES])
        vocab_size = vocab_size or _vocab_size(model, tok)
    else:
        raise ConfigError("give TEXT (or a FILE) with --model DIR, or --ids with --vocab-size")
    if any(t < 0 or t >= vocab_size for t in toks):
        raise ConfigError(f"token ids must be in [0, {vocab_size})")
    if len(toks) <= context_width:
        raise DataError(f"{len(toks)} tokens: nothing to score after the first {context_width} (the context)")
    d = detect(toks, vocab_size, gamma=gamma, key=key, z_threshold=z_threshold, context_width=context_width,
               scheme=scheme, ignore_repeated=ignore_repeated)
    return {**d.__dict__, "z_threshold": z_threshold, "false_positive_rate": false_positive_rate(z_threshold),
            "context_width": context_width, "scheme": scheme}


TEXT = typer.Argument(None, help="The text to test, or a file holding it (with --model).")
MODEL = typer.Option(None, "--model", "-m", "--tokenizer", "-t", help="The model (or tokenizer) directory that "
                     "generated the text.")
IDS = typer.Option(None, "--ids", help="Token ids instead of text, comma-separated.")
VOCAB = typer.Option(None, "--vocab-size", help="Vocabulary size (default: the model's; required with --ids).")
GAMMA = typer.Option(0.25, "--gamma", min=0.001, max=0.999, help="Green-list fraction used at generation.")
KEY = typer.Option(15485863, "--key", min=0, help="The watermark key used at generation.")
Z = typer.Option(4.0, "--z", help="Flag at z >= this (one-sided false-positive rate 1 - Phi(z)).")
WIDTH = typer.Option(1, "--context-width", min=1, max=16, help="Tokens seeding each green list (as at generation).")
SCHEME = typer.Option("lmstack", "--scheme", help="lmstack (SHA-256 of the context) or hf (transformers' "
                      "lefthash: key * previous token).")
REPEATED = typer.Option(False, "--ignore-repeated", help="Score each (context, token) n-gram once.")


@watermark_app.command("detect")
def detect_cmd(text: Optional[str] = TEXT, model: Optional[str] = MODEL, ids: Optional[str] = IDS,
               vocab_size: Optional[int] = VOCAB, gamma: float = GAMMA, key: int = KEY, z_threshold: float = Z,
               context_width: int = WIDTH, scheme: str = SCHEME, ignore_repeated: bool = REPEATED) -> None:
    """z = (|s|_G - gamma T) / sqrt(T gamma (1 - gamma)) over the T scored tokens, its p-value, and the verdict."""
    typer.echo(json.dumps(run_detect(text, model, ids, vocab_size, gamma, key, z_threshold, context_width, scheme,
                                     ignore_repeated)))
