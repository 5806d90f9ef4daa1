"""``lmstack support chat|serve``: the support assistant grounded in its knowledge-base index (retrieve ->
prompt -> model), in the terminal or over the OpenAI API + web chat."""

from __future__ import annotations

from typing import Optional

import typer

MODEL = typer.Option(..., "--model", "-m", help="Fine-tuned model directory (runs/NAME/finetune/final).")
INDEX = typer.Option(..., "--index", "-i", help="Retrieval index (runs/NAME/rag/index.sqlite).")
ADAPTER = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT layout) on top of --model.")
K = typer.Option(3, "--k", help="Passages retrieved per question (use the recipe's rag.k).")
SYSTEM = typer.Option(None, "--system", help="System prompt (default: the one the model was tuned with).")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available).")
RANKER = typer.Option(None, "--ranker", help="Answer-ranker weights (runs/NAME/reader/ranker.json, written by the "
                      "recipe's reader stage); default: the model's likelihood alone.")
MODE = typer.Option("select", "--mode", help="select: the model picks the passage sentence that answers; "
                    "generate: free generation from the grounded prompt.")


def register(app: typer.Typer) -> None:
    support = typer.Typer(help="The customer-support assistant, grounded in its knowledge base.",
                          no_args_is_help=True)
    app.add_typer(support, name="support")

    @support.command("chat")
    def chat(model: str = MODEL, index: str = INDEX, adapter: Optional[str] = ADAPTER, k: int = K,
             ranker: Optional[str] = RANKER,
             system: Optional[str] = SYSTEM, device: Optional[str] = DEVICE, mode: str = MODE,
             max_new_tokens: int = typer.Option(96, "--max-new-tokens", "-n"),
             show_context: bool = typer.Option(False, "--show-context", help="Print the passages each answer used."),
             ) -> None:
        """Chat in the terminal; every question retrieves passages first (/reset, /exit)."""
        from lmstack.apps.support.assistant import SupportAssistant
        from lmstack.apps.support.dialogues import SYSTEM_PROMPT

        if mode not in ("select", "generate"):
            raise typer.BadParameter("use select or generate", param_hint="--mode")
        from lmstack.rag import Retriever, query_lang

        retriever = Retriever(index)  # a bad path fails here, in one line, before the model loads
        bot = SupportAssistant(model, adapter, index=retriever, k=k, mode=mode, ranker=ranker,
                               system_prompt=system or SYSTEM_PROMPT, max_tokens=max_new_tokens, device=device,
                               max_num_seqs=1)
        typer.echo(f"Larkspur Home support ({len(bot.retriever)} passages indexed). /reset clears, /exit quits.")
        while True:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                typer.echo("")
                break
            if line == "/exit":
                break
            if line == "/reset":
                bot.reset()
                typer.echo("(conversation cleared)")
                continue
            if not line:
                continue
            answer = bot.ask(line)
            dense = getattr(bot.retriever, "dense", None)  # fused scores for the languages it embeds
            score = "rrf" if dense is not None and dense.covers(query_lang(line)) else "bm25"
            if show_context:
                for h in bot.last_context:
                    typer.echo(f"  [{h.rank}] {h.chunk.id}  ({score} {h.score:.2f})")
            typer.echo(answer)

    @support.command("serve")
    def serve(model: str = MODEL, index: str = INDEX, adapter: Optional[str] = ADAPTER, k: int = K,
              ranker: Optional[str] = RANKER,
              system: Optional[str] = SYSTEM, device: Optional[str] = DEVICE, mode: str = MODE,
              host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
              api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMSTACK_API_KEY"),
              ) -> None:
        """OpenAI API (/v1/chat/completions) + web chat at /, each chat request grounded in the index."""
        from lmstack.apps.support.dialogues import SYSTEM_PROMPT
        from lmstack.apps.support.server import serve_support

        if mode not in ("select", "generate"):
            raise typer.BadParameter("use select or generate", param_hint="--mode")
        serve_support(model, index, adapter=adapter, host=host, port=port, k=k,
                      system_prompt=system or SYSTEM_PROMPT, api_key=api_key, device=device, mode=mode,
                      ranker=ranker)
