"""``lmstack seq2seq train|generate``: fine-tune (full or LoRA) and run a T5 / mT5 / Flan-T5 directory.
Each verb parses its arguments and calls one function of :mod:`lmstack.tune.seq2seq`. (``lmstack generate
--model T5DIR`` runs the same generation.)"""

from __future__ import annotations

import json
from typing import Optional

import typer

seq2seq_app = typer.Typer(help="Encoder-decoder (T5 / mT5 / Flan-T5): fine-tune on input -> output pairs, generate.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(seq2seq_app, name="seq2seq")


@seq2seq_app.command("train")
def train_cmd(
    model: str = typer.Option(..., "--model", "-m", help="T5-family HF directory (with tokenizer)."),
    data: str = typer.Option(..., "--data", help='JSON Lines {"input": ..., "output": ...}.'),
    out: str = typer.Option(..., "--out", "-o", help="Output model directory (LoRA runs write the merged model)."),
    steps: int = typer.Option(100, "--steps"),
    lr: float = typer.Option(3e-4, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_source_len: int = typer.Option(512, "--max-source-len"),
    max_target_len: int = typer.Option(128, "--max-target-len"),
    lora_r: int = typer.Option(0, "--lora-r", help="LoRA rank; 0 = full fine-tuning."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    lora_targets: str = typer.Option("q,v", "--lora-targets", help="Comma-separated: q,k,v,o,wi,wi_0,wi_1,wo or all-linear."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Fine-tune on input -> output pairs; prints the loss and writes a plain HF T5 directory."""
    from lmstack.tune.seq2seq import Seq2SeqTrainConfig, train_seq2seq

    targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    res = train_seq2seq(Seq2SeqTrainConfig(
        model=model, data=data, out=out, steps=steps, lr=lr, batch_size=batch_size, max_source_len=max_source_len,
        max_target_len=max_target_len, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_targets=targets if targets != ["all-linear"] else "all-linear", seed=seed, device=device),
        log=typer.echo)
    typer.echo(json.dumps(res))


@seq2seq_app.command("generate")
def generate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="T5-family HF directory (with tokenizer)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Input text ('-' reads stdin)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Decode the output text for PROMPT."""
    import sys

    from lmstack.tune.seq2seq import generate_text

    text = sys.stdin.read() if prompt == "-" else prompt
    typer.echo(generate_text(model, [text], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, device=device)[0])
