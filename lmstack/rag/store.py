"""The retrieval index: one SQLite file with the chunks and an FTS5 table scored by BM25.

    from lmstack.rag import build_index, Retriever
    build_index(chunks, "runs/x/rag/index.sqlite")          # atomic: a reader never sees half an index
    r = Retriever("runs/x/rag/index.sqlite")
    r.search("How long does standard shipping take?", k=3)  # -> [Hit(chunk, score, rank), ...]

Schema (``meta`` holds the format version, the analyzer and a content hash of the chunks)::

    chunks(rowid, id UNIQUE, doc_id, lang, title, text, source, keywords)
    chunks_fts USING fts5(terms)            -- rowid = chunks.rowid; terms = analyze(title + text + keywords)

Scoring is FTS5's ``bm25()`` (Robertson/Sparck Jones Okapi BM25, k1 = 1.2, b = 0.75,
idf = ln((N - n + 0.5) / (n + 0.5)), floored at 1e-6): a query is the OR of its distinct terms
(:mod:`lmstack.rag.analyze`), so a chunk scores the sum of its matching terms' BM25 weights. Only Python's
bundled ``sqlite3`` is needed (FTS5 is compiled into CPython's SQLite); no extension is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmstack.errors import DataError
from lmstack.rag.analyze import terms
from lmstack.rag.chunk import Chunk

FORMAT = 1
ANALYZER = "lmstack.rag.analyze/1 (nfkc, lower, stop, light-stem, han-bigram)"


@dataclass
class Hit:
    chunk: Chunk
    score: float  # BM25, higher is better
    rank: int  # 1-based


def chunks_hash(chunks: Sequence[Chunk]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(json.dumps(c.to_dict(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _index_text(c: Chunk) -> str:
    return " ".join(terms(" ".join(x for x in (c.title, c.text, c.keywords) if x)))


def build_index(chunks: Iterable[Chunk], path: str | Path) -> dict[str, object]:
    """Write the index for ``chunks`` to ``path`` (atomically: built beside it, then renamed). Returns stats."""
    chunks = list(chunks)
    ids = [c.id for c in chunks]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise DataError(f"{path}: duplicate chunk ids {dup}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        con = sqlite3.connect(tmp)
        try:
            con.executescript("""
                PRAGMA journal_mode = OFF;
                CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE chunks(rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, doc_id TEXT, lang TEXT,
                                    title TEXT, text TEXT, source TEXT, keywords TEXT);
                CREATE INDEX chunks_lang ON chunks(lang);
                CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize = 'unicode61 remove_diacritics 0');
            """)
            n_terms = 0
            for i, c in enumerate(chunks, 1):
                con.execute("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?)",
                            (i, c.id, c.doc_id, c.lang, c.title, c.text, c.source, c.keywords))
                t = _index_text(c)
                n_terms += len(t.split())
                con.execute("INSERT INTO chunks_fts(rowid, terms) VALUES (?, ?)", (i, t))
            stats = {"format": FORMAT, "analyzer": ANALYZER, "chunks": len(chunks),
                     "documents": len({c.doc_id for c in chunks}), "terms": n_terms,
                     "chunks_sha256": chunks_hash(chunks)}
            con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in stats.items()])
            con.commit()
        finally:
            con.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return stats


def match_query(query: str) -> str | None:
    """The FTS5 MATCH expression for ``query``: its distinct terms, quoted, OR-ed (None when it has none)."""
    seen = list(dict.fromkeys(terms(query)))
    return " OR ".join(f'"{t}"' for t in seen) if seen else None


class Retriever:
    """BM25 search over an index file written by :func:`build_index`; hybrid BM25 + dense (reciprocal-rank
    fusion) for queries in the languages the index has embeddings for (:mod:`lmstack.rag.dense`).

    ``embedder``: "auto" loads the model the index was embedded with (when it has embeddings), None never
    uses embeddings, or an already loaded sentence-transformers model."""

    CANDIDATES = 20  # per ranking, before fusion

    def __init__(self, path: str | Path, embedder: Any = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: retrieval index not found (build it with lmstack.rag.build_index, "
                            "or run the recipe's rag stage)")
        try:
            self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self.meta = {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not an lmstack retrieval index ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{self.path}: index format {self.meta.get('format')}, this lmstack reads {FORMAT}; "
                            "rebuild it")
        self.dense = None
        if self.meta.get("dense_model") and embedder is not None:
            from lmstack.rag.dense import DenseIndex, load_embedder

            if embedder == "auto":
                embedder = load_embedder(self.meta["dense_model"])
            self.dense = DenseIndex(self.con, self.meta, embedder)

    def __len__(self) -> int:
        return int(self.meta.get("chunks", 0))

    def bm25(self, query: str, k: int, lang: str | None = None) -> list[tuple[int, float]]:
        """``[(chunk rowid, BM25 score)]``, best first."""
        expr = match_query(query)
        if expr is None or k <= 0:
            return []
        sql = ("SELECT c.rowid, bm25(chunks_fts) AS s FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
               "WHERE chunks_fts MATCH ?")
        args: list[object] = [expr]
        if lang:
            sql += " AND c.lang = ?"
            args.append(lang)
        sql += " ORDER BY s, c.rowid LIMIT ?"
        args.append(k)
        return [(int(r), -float(s)) for r, s in self.con.execute(sql, args).fetchall()]

    def _chunks(self, rowids: list[int]) -> dict[int, Chunk]:
        if not rowids:
            return {}
        q = ",".join("?" * len(rowids))
        rows = self.con.execute(f"SELECT rowid, id, doc_id, text, title, lang, source, keywords FROM chunks "
                                f"WHERE rowid IN ({q})", rowids).fetchall()
        return {int(r[0]): Chunk(*r[1:]) for r in rows}

    def search(self, query: str, k: int = 3, lang: str | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query`` (optionally only chunks in ``lang``), best first. The score is
        BM25, or the fused reciprocal-rank score when embeddings take part."""
        if k <= 0 or not query.strip():
            return []
        from lmstack.rag.analyze import query_lang

        if self.dense is not None and self.dense.covers(lang or query_lang(query)):
            from lmstack.rag.dense import rrf

            lexical = [r for r, _ in self.bm25(query, self.CANDIDATES, lang)]
            dense = self.dense.rank(query, self.CANDIDATES * 4)
            if lang:
                langs = {r: c.lang for r, c in self._chunks(dense).items()}
                dense = [r for r in dense if langs.get(r) == lang]
            ranked = rrf([lexical, dense[:self.CANDIDATES]])[:k]
        else:
            ranked = self.bm25(query, k, lang)
        chunks = self._chunks([r for r, _ in ranked])
        return [Hit(chunks[r], s, i + 1) for i, (r, s) in enumerate(ranked)]

    def get(self, chunk_id: str) -> Chunk | None:
        row = self.con.execute("SELECT id, doc_id, text, title, lang, source, keywords FROM chunks WHERE id = ?",
                               (chunk_id,)).fetchone()
        return Chunk(*row) if row else None

    def close(self) -> None:
        self.con.close()
