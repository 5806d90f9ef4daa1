"""``lmstack generate`` (stream one completion) and ``lmstack chat`` (terminal chat) on the serving engine."""

from __future__ import annotations

from typing import Optional

import typer


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float,
              repetition_penalty: float, seed: Optional[int], stop: list[str]) -> dict:
    return dict(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []))


MODEL = typer.Option(..., "--model", "-m", help="Model directory (Hugging Face layout, with tokenizer).")
ADAPTER = typer.Option(None, "--adapter", help="LoRA / prompt / prefix adapter directory (PEFT layout).")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available).")
DTYPE = typer.Option(None, "--dtype", help="fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU).")
MAX_NEW = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens to generate.")
TEMP = typer.Option(0.8, "--temperature", "-t", help="0 = greedy.")
TOP_P = typer.Option(0.95, "--top-p")
TOP_K = typer.Option(0, "--top-k", help="0 = off.")
MIN_P = typer.Option(0.0, "--min-p")
REP = typer.Option(1.0, "--repetition-penalty")
SEED = typer.Option(None, "--seed", help="Same seed, same text.")
STOP = typer.Option(None, "--stop", help="Stop string (repeatable); never printed.")
SPEC_MODEL = typer.Option(None, "--speculative-model",
                          help="Draft model directory sharing the tokenizer (speculative decoding; docs/export.md).")
SPEC_K = typer.Option(4, "--num-speculative-tokens", help="Tokens the draft proposes per step (1-16).")
TP = typer.Option(1, "--tp", help="Tensor-parallel ranks: split the model's heads and MLP over N processes "
                  "(gloo on CPU, NCCL on N GPUs; docs/serving.md).")


def speculative_kw(model: Optional[str], k: int) -> dict:
    """lmstack.load keywords for --speculative-model / --num-speculative-tokens."""
    return {} if model is None else {"speculative_model": model, "num_speculative_tokens": k}


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: str = MODEL,
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
        adapter: Optional[str] = ADAPTER, device: Optional[str] = DEVICE, dtype: Optional[str] = DTYPE,
        max_new_tokens: int = MAX_NEW, temperature: float = TEMP, top_p: float = TOP_P, top_k: int = TOP_K,
        min_p: float = MIN_P, repetition_penalty: float = REP, seed: Optional[int] = SEED,
        stop: Optional[list[str]] = STOP, speculative_model: Optional[str] = SPEC_MODEL,
        num_speculative_tokens: int = SPEC_K, tp: int = TP,
    ) -> None:
        """Complete PROMPT with the model, streaming text to stdout."""
        import sys

        from lmstack.serve.llm import load
        from lmstack.serve.terminal import stream_completion

        text = sys.stdin.read() if prompt == "-" else prompt
        from lmstack.model.seq2seq import is_seq2seq_dir

        if is_seq2seq_dir(model):  # T5-family encoder-decoder: its own cached decoder loop (lmstack.tune.seq2seq)
            from lmstack.errors import ConfigError
            from lmstack.tune.seq2seq import generate_text

            if adapter or speculative_model or stop or top_k or min_p or repetition_penalty != 1.0 or tp != 1:
                raise ConfigError("a T5-family model generates with --max-new-tokens, --temperature, --top-p and "
                                  "--seed only (no adapter, stop strings, top-k, min-p, repetition penalty, --tp)")
            sys.stdout.write(generate_text(model, [text], max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_p=top_p, seed=seed, device=device, dtype=dtype)[0] + "\n")
            return
        llm = load(model, adapter=adapter, device=device, dtype=dtype, max_num_seqs=1, tensor_parallel=tp,
                   **speculative_kw(speculative_model, num_speculative_tokens))
        try:
            stream_completion(llm, text, lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                              **_sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
                                          stop))
            sys.stdout.write("\n")
        finally:
            llm.close()  # the tensor-parallel workers, if any

    @app.command("chat")
    def chat(
        model: str = MODEL, system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
        adapter: Optional[str] = ADAPTER, device: Optional[str] = DEVICE, dtype: Optional[str] = DTYPE,
        max_new_tokens: int = MAX_NEW, temperature: float = TEMP, top_p: float = TOP_P, top_k: int = TOP_K,
        min_p: float = MIN_P, repetition_penalty: float = REP, seed: Optional[int] = SEED,
        stop: Optional[list[str]] = STOP, tp: int = TP,
    ) -> None:
        """Chat in the terminal using the tokenizer's chat template (/reset, /exit)."""
        import sys

        from lmstack.serve.llm import load
        from lmstack.serve.terminal import chat_loop

        llm = load(model, adapter=adapter, device=device, dtype=dtype, max_num_seqs=1, tensor_parallel=tp)
        try:
            chat_loop(llm, input, lambda s: (sys.stdout.write(s), sys.stdout.flush()), system=system,
                      **_sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop))
        finally:
            llm.close()
