"""``lmstack support chat|serve``: the support assistant grounded in its knowledge-base index (retrieve ->
prompt -> model), in the terminal or over the OpenAI API + web chat."""

from __future__ import annotations

from typing import Optional

import typer

BUNDLE = typer.Argument(None, help="The assistant's bundle (runs/NAME/bundle, written by `lmstack run`): model, "
                        "index, ranker, k and system prompt; no other flag needed.")
MODEL = typer.Option(None, "--model", "-m", help="Without a bundle: fine-tuned model directory.")
INDEX = typer.Option(None, "--index", "-i", help="Without a bundle: retrieval index (runs/NAME/rag/index.sqlite).")
ADAPTER = typer.Option(None, "--adapter", help="LoRA adapter directory (PEFT layout) on top of --model.")
K = typer.Option(None, "--k", help="Passages retrieved per question (default: the bundle's, else 3).")
SYSTEM = typer.Option(None, "--system", help="System prompt (default: the bundle's / the one the model was tuned with).")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available).")
RANKER = typer.Option(None, "--ranker", help="Answer-ranker weights (runs/NAME/reader/ranker.json, written by the "
                      "recipe's reader stage); default: the model's likelihood alone.")
GUARD = typer.Option(None, "--guard", help="Guardrails policy YAML (docs/guard.md): `default` (the shipped "
                     "support policy), a path, or `off`; default: the bundle's policy, else none.")
MODE = typer.Option(None, "--mode", help="select: the model picks the passage sentence that answers; "
                    "generate: free generation from the grounded prompt (default: the bundle's, else select).")


def assistant_kwargs(bundle: Optional[str], **flags) -> dict:
    """The assistant's settings: the bundle's, with the flags given on the command line winning; without a
    bundle, --model and --index are required (the flags of earlier releases keep working)."""
    from lmstack.apps.support.assistant import bundle_kwargs
    from lmstack.apps.support.dialogues import SYSTEM_PROMPT
    from lmstack.apps.support.retrieval import DEFAULT_K

    given = {k: v for k, v in flags.items() if v is not None}
    if bundle is not None:
        out = {**bundle_kwargs(bundle), **given}
        if out.get("guard") == _OFF:
            out["guard"] = None
        return out
    if given.get("guard") == _OFF:
        given.pop("guard")
    for flag, key in (("--model", "model"), ("--index", "index")):
        if key not in given:
            raise typer.BadParameter(f"give a bundle (runs/NAME/bundle) or {flag}", param_hint=flag)
    return {"k": DEFAULT_K, "mode": "select", "system_prompt": SYSTEM_PROMPT, **given}


_OFF = "__off__"


def _guard(flag: Optional[str]) -> Optional[str]:
    """--guard: None (the bundle decides), `default` (the shipped support policy), `off`, or a path."""
    if flag is None or flag == "off":
        return None if flag is None else _OFF
    from lmstack.guard.policy import policy_path

    return str(policy_path(flag))


def _mode(mode: Optional[str]) -> None:
    if mode not in (None, "select", "generate"):
        raise typer.BadParameter("use select or generate", param_hint="--mode")


def register(app: typer.Typer) -> None:
    support = typer.Typer(help="The customer-support assistant, grounded in its knowledge base.",
                          no_args_is_help=True)
    app.add_typer(support, name="support")

    @support.command("chat")
    def chat(bundle: Optional[str] = BUNDLE, model: Optional[str] = MODEL, index: Optional[str] = INDEX,
             adapter: Optional[str] = ADAPTER, k: Optional[int] = K, ranker: Optional[str] = RANKER,
             system: Optional[str] = SYSTEM, device: Optional[str] = DEVICE, mode: Optional[str] = MODE,
             max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n"), guard: Optional[str] = GUARD,
             show_context: bool = typer.Option(False, "--show-context", help="Print the passages each answer used."),
             ) -> None:
        """Chat in the terminal; every question retrieves passages first (/reset, /exit)."""
        from lmstack.apps.support.assistant import SupportAssistant
        from lmstack.apps.support.retrieval import open_kb_retriever
        from lmstack.rag import query_lang

        _mode(mode)
        kw = assistant_kwargs(bundle, model=model, index=index, adapter=adapter, k=k, ranker=ranker,
                              system_prompt=system, mode=mode, max_tokens=max_new_tokens, device=device,
                              guard=_guard(guard))
        if kw.get("guard") is not None:
            from lmstack.guard import Guard

            kw["guard"] = Guard.from_policy(kw["guard"])  # a bad policy: one line, before the model loads
        kw["index"] = open_kb_retriever(kw["index"])  # a bad path fails here, in one line, before the model loads
        bot = SupportAssistant(**kw, max_num_seqs=1)
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
            pieces = []
            for piece in bot.stream(line):  # printed as it is generated
                pieces.append(piece)
                typer.echo(piece, nl=False)
            typer.echo("")
            r = bot.retriever  # fused scores for the languages it embeds (a document index, or an older file's)
            covers = getattr(r, "covers", None) or getattr(getattr(r, "dense", None), "covers", None)
            score = "rrf" if covers is not None and covers(query_lang(line)) else "bm25"
            cited = {id(h) for h in bot.cited("".join(pieces))}
            for h in bot.last_context if show_context else bot.cited("".join(pieces)):
                mark = " (cited)" if show_context and id(h) in cited else ""
                typer.echo(f"  [{h.rank}] {h.chunk.id}  ({score} {h.score:.2f}){mark}: "
                           f"{' '.join(h.chunk.text.split())[:100]}")

    @support.command("serve")
    def serve(bundle: Optional[str] = BUNDLE, model: Optional[str] = MODEL, index: Optional[str] = INDEX,
              adapter: Optional[str] = ADAPTER, k: Optional[int] = K, ranker: Optional[str] = RANKER,
              system: Optional[str] = SYSTEM, device: Optional[str] = DEVICE, mode: Optional[str] = MODE,
              host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port", min=1, max=65535),
              api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMSTACK_API_KEY"),
              guard: Optional[str] = GUARD,
              ) -> None:
        """OpenAI API (/v1/chat/completions) + web chat at /, each chat request grounded in the index."""
        from lmstack.apps.support.server import serve_support

        _mode(mode)
        kw = assistant_kwargs(bundle, model=model, index=index, adapter=adapter, k=k, ranker=ranker,
                              system_prompt=system, mode=mode, device=device, guard=_guard(guard))
        kw.pop("max_tokens", None), kw.pop("context_max_chars", None)
        g = kw.pop("guard", None)
        serve_support(kw.pop("model"), kw.pop("index"), host=host, port=port, api_key=api_key,
                      guard=str(g) if g is not None else None, **kw)

    @support.command("desk")
    def desk(desk_dir: str = typer.Argument(..., help="The desk stage's directory (runs/support-desk/desk)."),
             guard: Optional[str] = typer.Option("default", "--guard", help="Guardrails policy whose input rails "
                                                 "escalate; 'off' to run without."),
             as_json: bool = typer.Option(False, "--json", help="Print each reply as JSON (intent, slots, ticket)."),
             ) -> None:
        """The support desk in the terminal: one customer turn a line (/reset, /exit); order tools, confirmation
        before a cancellation, escalation to a person with a ticket in the order database."""
        import json
        import sys

        from lmstack.apps.support.desk import Desk

        d = Desk.load(desk_dir, guard=None if guard == "off" else guard)
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                d.reset()
                continue
            if not line.strip():
                continue
            r = d.turn(line)
            typer.echo(json.dumps(r, ensure_ascii=False) if as_json else f"desk> {r['text']}")
