"""Retrieval-augmented generation: chunk documents, index them in SQLite FTS5, retrieve with BM25, and put
the passages into the prompt. See docs/rag.md.

    from lmstack.rag import chunk_documents, build_index, Retriever, with_context
    build_index(chunk_documents(docs), "index.sqlite")
    hits = Retriever("index.sqlite").search("退货运费谁出？", k=3)
    system = with_context("You are a support assistant.", hits)
"""

from lmstack.rag.analyze import query_lang, terms
from lmstack.rag.chunk import Chunk, chunk_documents, chunk_text
from lmstack.rag.prompt import HEADER, format_context, recall_at_k, with_context
from lmstack.rag.store import Hit, Retriever, build_index, match_query

__all__ = ["Chunk", "chunk_documents", "chunk_text", "terms", "query_lang", "Hit", "Retriever", "build_index",
           "match_query", "HEADER", "format_context", "with_context", "recall_at_k"]
