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
    out: str = typer.Option(None, "--out", "-o", help="Output model directory (default: runs/classifier, "
                                                    "runs/tagger for --task tokens)."),
    task: str = typer.Option("text", "--task", help="text: one label per text (BertForSequenceClassification); "
                             "tokens: BIO tags per word (BertForTokenClassification; data {tokens, tags}, default "
                             "the shipped EN+ZH PII/NER set lmstack/model/data/pii_ner.jsonl)."),
    data: str = typer.Option(None, "--data", help="JSON Lines {text, label[, split]}; default: the shipped "
                                                  "EN+ZH intent set (lmstack/model/data/intents.jsonl)."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out records (default: split == test)."),
    init: str = typer.Option(None, "--init", "--model", help="A local BERT or ModernBERT directory to fine-tune "
                             "(default: a fresh small BERT)."),
    epochs: int = typer.Option(None, "--epochs", help="Default 30 (text), 40 (tokens)."),
    lr: float = typer.Option(None, "--lr", help="Default 1e-3 (text), 2e-3 (tokens)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(None, "--max-length", help="Default 64 (text), 96 (tokens)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a classifier; writes a transformers-loadable (Modern)BertFor{Sequence,Token}Classification dir + metrics.json."""
    from lmstack.errors import ConfigError

    if task not in ("text", "tokens"):
        raise ConfigError(f"--task {task!r}; choose text or tokens")
    kw = dict(eval_data=eval_data, init=init, batch_size=batch_size, seed=seed)
    kw.update({k: v for k, v in dict(out=out, data=data, epochs=epochs, lr=lr, max_length=max_length).items()
               if v is not None})
    if task == "tokens":
        from lmstack.model.tokclass import TokenClassifyConfig, train_tagger

        m = train_tagger(TokenClassifyConfig(**kw))
    else:
        from lmstack.model.classify import ClassifyConfig, train_classifier

        m = train_classifier(ClassifyConfig(**kw))
    typer.echo(json.dumps({k: v for k, v in m.items() if k != "labels"}, ensure_ascii=False))


@classify_app.command("eval")
def eval_cmd(model_dir: str = typer.Argument(..., help="A classifier directory."),
             data: str = typer.Option(..., "--data", help="Labelled JSON Lines {text, label[, lang]}.")) -> None:
    """Accuracy and macro-F1 (overall and per language) on labelled records; for a token classifier, entity-level
    precision / recall / F1 on {tokens, tags} records."""
    if _is_tagger(model_dir):
        from lmstack.model.tokclass import evaluate_tagger

        typer.echo(json.dumps(evaluate_tagger(model_dir, data), ensure_ascii=False))
        return
    from lmstack.model.classify import evaluate_classifier

    typer.echo(json.dumps(evaluate_classifier(model_dir, data), ensure_ascii=False))


def _is_tagger(model_dir: str) -> bool:
    from lmstack.model.encoder import encoder_head

    return encoder_head(model_dir) == "tok_cls"


@classify_app.command("predict")
def predict_cmd(model_dir: str = typer.Argument(..., help="A classifier directory."),
                texts: list[str] = typer.Argument(None, help="Texts to classify (or --file)."),
                file: str = typer.Option(None, "--file", help="JSON Lines with a text field, one record a line.")) -> None:
    """Print one JSON line per text: {text, label, score}; for a token classifier {text, entities}."""
    if _is_tagger(model_dir):
        from lmstack.model.tokclass import tag_texts

        if file:
            from lmstack.errors import ConfigError

            raise ConfigError("--file is for text classifiers; pass the texts to tag as arguments")
        for r in tag_texts(model_dir, texts or []):
            typer.echo(json.dumps(r, ensure_ascii=False))
        return
    from lmstack.model.classify import predict_texts

    for r in predict_texts(model_dir, texts or [], file):
        typer.echo(json.dumps(r, ensure_ascii=False))
