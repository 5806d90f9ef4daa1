"""``lmstack tokenizer train|encode|decode|chat``: thin wrappers over :mod:`lmstack.tokenizer`."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    tok_app = typer.Typer(help="Train and inspect byte-level BPE tokenizers (Hugging Face tokenizer.json).",
                          no_args_is_help=True)
    app.add_typer(tok_app, name="tokenizer")

    @tok_app.command("train")
    def train(
        input: List[str] = typer.Option(..., "--input", "-i", help="Files or directories (.txt .md .jsonl .parquet, "
                                        ".gz/.zst ok). Repeat or pass several."),
        vocab_size: int = typer.Option(32000, "--vocab-size", help="Total vocabulary: 256 bytes + specials + merges."),
        out: str = typer.Option(..., "--out", "-o", help="Output directory (tokenizer.json, tokenizer_config.json)."),
        min_frequency: int = typer.Option(2, "--min-frequency", help="Minimum pair count for a merge."),
        text_field: str = typer.Option("text", "--text-field", help="JSONL/Parquet field holding the text."),
        special_token: Optional[List[str]] = typer.Option(None, "--special-token",
                                                          help="Replace the default special tokens (repeat)."),
        sample_rate: float = typer.Option(1.0, "--sample-rate", help="Train on this fraction of documents."),
        max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Stop reading after this many chars."),
        seed: int = typer.Option(0, "--seed", help="Seed of --sample-rate."),
    ) -> None:
        """Train a byte-level BPE tokenizer with lmstack's split pattern and ChatML chat template."""
        from pathlib import Path

        from lmstack.tokenizer import train_tokenizer

        tok = train_tokenizer([Path(p) for p in input], vocab_size=vocab_size, out_dir=out,
                              special_tokens=special_token or None, min_frequency=min_frequency,
                              text_field=text_field, sample_rate=sample_rate, max_chars=max_chars, seed=seed)
        st = tok.train_stats
        typer.echo(f"wrote {out}: vocab {tok.vocab_size}, {st.documents} documents, {st.chars / 1e6:.1f} M chars "
                   f"read, {st.trained_chars / 1e6:.1f} M trained on, {st.bad_records} malformed records skipped, "
                   f"sha256 {tok.sha256[:16]}")

    @tok_app.command("stats")
    def stats(
        tokenizer_dirs: List[str] = typer.Argument(..., help="One or more tokenizer directories to compare."),
        input: List[str] = typer.Option(..., "--input", "-i", help="Files or directories of text (as for train)."),
        text_field: str = typer.Option("text", "--text-field"),
        max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Read at most this many characters."),
    ) -> None:
        """Bytes and characters per token of each tokenizer on the same text."""
        from pathlib import Path

        from rich.console import Console
        from rich.table import Table

        from lmstack.tokenizer import Tokenizer
        from lmstack.tokenizer.stats import tokenizer_stats

        toks = [Tokenizer.from_dir(d) for d in tokenizer_dirs]
        rows = tokenizer_stats(toks, [Path(p) for p in input], text_field=text_field, max_chars=max_chars)
        t = Table(title=f"{rows[0]['documents']} documents, {rows[0]['bytes'] / 1e6:.2f} MB")
        for col in ("tokenizer", "vocab", "tokens", "bytes/token", "chars/token"):
            t.add_column(col, justify="left" if col == "tokenizer" else "right")
        for d, tok, r in zip(tokenizer_dirs, toks, rows):
            t.add_row(d, str(tok.vocab_size), str(r["tokens"]), f"{r['bytes_per_token']:.3f}",
                      f"{r['chars_per_token']:.3f}")
        Console().print(t)

    @tok_app.command("encode")
    def encode(
        tokenizer_dir: str = typer.Argument(..., help="Tokenizer directory."),
        text: str = typer.Argument(..., help="Text to encode."),
        show_tokens: bool = typer.Option(False, "--tokens", help="Also print each token's text."),
    ) -> None:
        """Print the token ids of TEXT."""
        from lmstack.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tokenizer_dir)
        ids = tok.encode(text)
        typer.echo(" ".join(map(str, ids)))
        if show_tokens:
            typer.echo(" | ".join(repr(tok.decode([i])) for i in ids))
        typer.echo(f"{len(ids)} tokens, {len(text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")

    @tok_app.command("decode")
    def decode(
        tokenizer_dir: str = typer.Argument(..., help="Tokenizer directory."),
        ids: List[int] = typer.Argument(..., help="Token ids."),
        skip_special_tokens: bool = typer.Option(False, "--skip-special-tokens"),
    ) -> None:
        """Print the text of token IDS."""
        from lmstack.tokenizer import Tokenizer

        typer.echo(Tokenizer.from_dir(tokenizer_dir).decode(ids, skip_special_tokens=skip_special_tokens))

    @tok_app.command("chat")
    def chat(
        tokenizer_dir: str = typer.Argument(..., help="Tokenizer directory."),
        messages_json: str = typer.Argument(..., help="A JSON file with a list of {role, content} messages."),
        add_generation_prompt: bool = typer.Option(False, "--add-generation-prompt"),
    ) -> None:
        """Render a conversation with the chat template and show which tokens the loss trains on."""
        from lmstack.tokenizer.cli_helpers import show_chat

        typer.echo(show_chat(tokenizer_dir, messages_json, add_generation_prompt))
