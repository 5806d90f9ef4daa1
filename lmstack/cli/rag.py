"""``lmstack rag index|search|ask|eval``: index a folder of documents, search it, answer from it with cited sources,
and measure retrieval and answers on labelled questions (docs/rag.md). ``lmstack serve --rag INDEX`` serves it."""

from __future__ import annotations

import json
from typing import Optional

import typer

INDEX = typer.Option(..., "--index", "-i", help="The index file (one SQLite file), e.g. docs.sqlite.")
MODE = typer.Option("hybrid", "--mode", help="hybrid (BM25 + embeddings, reciprocal-rank fusion), bm25 or dense.")
STORE = typer.Option("auto", "--store", help="Vector search: auto (exact up to 100k vectors, then usearch HNSW), "
                     "exact, usearch, or qdrant (at --store-location).")
STORE_AT = typer.Option(":memory:", "--store-location", help="For --store qdrant: :memory:, a folder (local mode) "
                        "or a server URL (http://localhost:6333).")
EMBEDDER = typer.Option("auto", "--embedder", help="auto (the packaged all-MiniLM-L6-v2 when installed), none, or a "
                        "local sentence-transformers directory.")


def _echo(obj) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=1))


def register(app: typer.Typer) -> None:
    rag = typer.Typer(help="Retrieval-augmented answers over your documents: index, search, ask, eval.",
                      no_args_is_help=True)
    app.add_typer(rag, name="rag")

    @rag.command("index")
    def index(
        docs: list[str] = typer.Option(..., "--docs", "-d", help="A folder (searched recursively) or file; repeat. "
                                       "The index mirrors them: files gone from them are removed."),
        index: str = INDEX, embedder: str = EMBEDDER,
        chunk_tokens: int = typer.Option(256, "--chunk-tokens", min=8, help="Most tokens per chunk."),
        overlap: int = typer.Option(32, "--overlap", min=0, help="Tokens of the previous chunk repeated."),
        han: str = typer.Option("bigram", "--han", help="Chinese BM25 terms: bigram (character bigrams) or jieba."),
        dense_langs: Optional[str] = typer.Option(None, "--dense-langs", help="Chunk languages to embed, e.g. en "
                                                  "or en,zh or all (default: en for MiniLM, all for others)."),
    ) -> None:
        """Index (or update) documents: .txt .md .html .pdf .docx .jsonl .csv. Only changed files are re-embedded."""
        from lmstack.rag.index import index_documents

        langs = "default" if dense_langs is None else None if dense_langs == "all" else dense_langs.split(",")

        def tell(source: str, status: str) -> None:
            if status in ("added", "updated"):
                typer.echo(f"{status:>9}  {source}", err=True)

        rep = index_documents(docs, index, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap, han=han,
                              dense_langs=langs, on_file=tell)
        for source, reason in rep.failed:
            typer.echo(f"lmstack: skipped {source}: {reason}", err=True)
        typer.echo(f"{index}: {rep.documents_total} documents, {rep.chunks_total} chunks "
                   f"(added {len(rep.added)}, updated {len(rep.updated)}, unchanged {len(rep.unchanged)}, "
                   f"removed {len(rep.removed)}, failed {len(rep.failed)}; {rep.chunks_written} chunks and "
                   f"{rep.vectors_written} vectors written)")

    @rag.command("search")
    def search(question: str = typer.Argument(..., help="The query."), index: str = INDEX,
               k: int = typer.Option(5, "--k", min=1, max=100), mode: str = MODE,
               source: Optional[str] = typer.Option(None, "--source", help="Only sources matching this glob."),
               lang: Optional[str] = typer.Option(None, "--lang", help="Only chunks in this language (en, zh)."),
               store: str = STORE, store_location: str = STORE_AT) -> None:
        """The top chunks for a query, as JSON (no model)."""
        from lmstack.rag.answer import sources
        from lmstack.rag.index import DocRetriever

        hits = DocRetriever(index, embedder="auto" if mode != "bm25" else None, store=store,
                            store_location=store_location).search(
            question, k, mode=mode, source=source, lang=lang)
        _echo(sources(hits))

    @rag.command("ask")
    def ask(question: str = typer.Argument(..., help="The question."), index: str = INDEX,
            model: str = typer.Option(..., "--model", "-m", help="Model directory (or .gguf) that answers."),
            k: int = typer.Option(5, "--k", min=1, max=50, help="Chunks shown to the model."), mode: str = MODE,
            max_tokens: int = typer.Option(256, "--max-tokens", min=1),
            device: Optional[str] = typer.Option(None, "--device"),
            as_json: bool = typer.Option(False, "--json", help="Print the answer and sources as JSON.")) -> None:
        """Answer a question from the index; the answer cites [n] and the sources are listed."""
        from lmstack.rag.answer import ask as answer_question
        from lmstack.rag.index import DocRetriever
        from lmstack.serve.llm import load

        retriever = DocRetriever(index, embedder="auto" if mode != "bm25" else None)  # a bad index fails first
        llm = load(model, device=device, max_num_seqs=1)
        out = answer_question(llm, retriever, question, k=k, mode=mode, max_tokens=max_tokens)
        if as_json:
            return _echo(out)
        typer.echo(out["answer"].strip())
        typer.echo("")
        for s in out["sources"]:
            mark = "*" if s["cited"] else " "
            page = f" p. {s['page']}" if s["page"] else ""
            head = f" > {s['headings']}" if s["headings"] else ""
            typer.echo(f"{mark}[{s['n']}] {s['source']}{page}{head}")

    @rag.command("eval")
    def evaluate(index: str = INDEX,
                 questions: str = typer.Option(..., "--questions", "-q", help="Labelled questions (JSONL, docs/rag.md)."),
                 mode: str = MODE, k: list[int] = typer.Option([1, 3, 5, 10], "--k", help="Cut-offs; repeat."),
                 model: Optional[str] = typer.Option(None, "--model", "-m", help="Also answer with this model and "
                                                     "score faithfulness and citation accuracy."),
                 answer_k: int = typer.Option(5, "--answer-k", min=1, max=50),
                 max_tokens: int = typer.Option(256, "--max-tokens", min=1),
                 device: Optional[str] = typer.Option(None, "--device"),
                 output: Optional[str] = typer.Option(None, "--output", "-o", help="Also write the report (JSON)."),
                 store: str = STORE, store_location: str = STORE_AT) -> None:
        """recall@k, MRR and nDCG on labelled questions (+ faithfulness and citation accuracy with --model)."""
        from lmstack.rag.evaluate import evaluate as run_eval, read_questions
        from lmstack.rag.index import DocRetriever

        qs = read_questions(questions)
        retriever = DocRetriever(index, embedder="auto" if mode != "bm25" else None, store=store,
                                 store_location=store_location)
        llm = None
        if model is not None:
            from lmstack.serve.llm import load

            llm = load(model, device=device)
        report = run_eval(retriever, qs, ks=sorted(set(k)), mode=mode, llm=llm, answer_k=answer_k,
                          max_tokens=max_tokens)
        if output:
            from lmstack.utils.io import atomic_write_text

            atomic_write_text(output, json.dumps(report, ensure_ascii=False, indent=1))
        _echo({key: v for key, v in report.items() if key != "answers"})
