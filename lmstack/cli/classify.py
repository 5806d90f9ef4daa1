"""``lmstack classify train|eval|predict``: text classification with the BERT-style encoder (intents first).
Each verb parses its arguments and calls one function of :mod:`lmstack.model.classify`."""

from __future__ import annotations

import json

import typer

classify_app = typer.Typer(help="Text classification (intent recognition): train, eval, predict.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(classify_app, name="classify")


@classify_app.command("train")
def train_cmd(
    out: str = typer.Option("runs/classifier", "--out", "-o", help="Output model directory."),
    data: str = typer.Option(None, "--data", help="JSON Lines {text, label[, split]}; default: the shipped "
                                                  "EN+ZH intent set (lmstack/model/data/intents.jsonl)."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out records (default: split == test)."),
    init: str = typer.Option(None, "--init", help="A local BERT directory to fine-tune (default: a fresh encoder)."),
    epochs: int = typer.Option(30, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(64, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a classifier; writes a transformers-loadable BertForSequenceClassification dir + metrics.json."""
    from lmstack.model.classify import ClassifyConfig, train_classifier

    kw = dict(out=out, eval_data=eval_data, init=init, epochs=epochs, lr=lr, batch_size=batch_size,
              max_length=max_length, seed=seed)
    if data:
        kw["data"] = data
    m = train_classifier(ClassifyConfig(**kw))
    typer.echo(json.dumps({k: v for k, v in m.items() if k != "labels"}, ensure_ascii=False))


@classify_app.command("eval")
def eval_cmd(model_dir: str = typer.Argument(..., help="A classifier directory."),
             data: str = typer.Option(..., "--data", help="Labelled JSON Lines {text, label[, lang]}.")) -> None:
    """Accuracy and macro-F1 (overall and per language) on labelled records."""
    from lmstack.model.classify import evaluate_classifier

    typer.echo(json.dumps(evaluate_classifier(model_dir, data), ensure_ascii=False))


@classify_app.command("predict")
def predict_cmd(model_dir: str = typer.Argument(..., help="A classifier directory."),
                texts: list[str] = typer.Argument(None, help="Texts to classify (or --file)."),
                file: str = typer.Option(None, "--file", help="JSON Lines with a text field, one record a line.")) -> None:
    """Print one JSON line per text: {text, label, score}."""
    from lmstack.model.classify import predict_texts

    for r in predict_texts(model_dir, texts or [], file):
        typer.echo(json.dumps(r, ensure_ascii=False))
