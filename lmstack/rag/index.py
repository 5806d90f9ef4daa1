"""The document index behind ``lmstack rag index``: files -> chunks -> one SQLite file, kept up to date
incrementally.

    report = index_documents(["manuals/"], "docs.sqlite", embedder="auto", chunk_tokens=256, overlap=32)
    r = DocRetriever("docs.sqlite")
    r.search("How do I reset the router?", k=5)          # hybrid: BM25 + dense, reciprocal-rank fusion

Schema (one file; the ``chunks``/``chunks_fts``/``dense`` tables are those of :mod:`lmstack.rag.store`, so
:class:`lmstack.rag.Retriever` reads this index too)::

    meta(key, value)                          -- format, kind "docs", analyzer, settings, dense model
    documents(source PK, sha256, title, text, chunks, error)
    chunks(rowid, id UNIQUE, doc_id, lang, title, text, source, keywords, headings, page, start, end)
    chunks_fts USING fts5(terms)              -- BM25 over lmstack.rag.analyze terms
    dense(chunk_rowid, vec)                   -- float32 L2-normalised embeddings

**Incremental.** A document's ``sha256`` covers its bytes and the settings that shape its chunks (chunk size,
overlap, Chinese analyzer, embedder); a re-run skips files whose hash is unchanged, re-chunks and re-embeds only
changed ones and deletes the chunks of files that are gone. Each file is written in its own transaction, so a
run that is interrupted keeps the files it finished and the next run resumes after them; a reader (a server
answering from the index) sees every file either before or after, never half. Chunks are embedded in batches of
:data:`EMBED_BATCH` across files (many small files cost one model call, not one each), so an interrupted run
loses at most the files of the batch in flight. A file that fails to load is
reported with its reason and the rest are indexed (its old chunks, if any, stay until it loads again).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lmstack.errors import ConfigError, DataError
from lmstack.rag.analyze import HAN_MODES, has_han, query_lang, terms
from lmstack.rag.chunk import Chunk, chunk_blocks
from lmstack.rag.loaders import find_files, load_file
from lmstack.rag.store import ANALYZER, FORMAT, Hit

KIND = "docs"
EMBED_BATCH = 256  # chunks embedded together (across files) before their files are written
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS documents(source TEXT PRIMARY KEY, sha256 TEXT, title TEXT, text TEXT, chunks INTEGER);
CREATE TABLE IF NOT EXISTS chunks(rowid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, doc_id TEXT, lang TEXT,
                                  title TEXT, text TEXT, source TEXT, keywords TEXT, headings TEXT, page INTEGER,
                                  start INTEGER, "end" INTEGER);
CREATE INDEX IF NOT EXISTS chunks_lang ON chunks(lang);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(terms, tokenize = 'unicode61 remove_diacritics 0');
CREATE TABLE IF NOT EXISTS dense(chunk_rowid INTEGER, vec BLOB);
CREATE INDEX IF NOT EXISTS dense_owner ON dense(chunk_rowid);
"""


@dataclass
class SourceChunk(Chunk):
    """A chunk of a file: where it is (``headings`` joined by " > ", 1-based ``page``, character offsets into
    the document's extracted text: ``documents.text[start:end] == text``)."""
    headings: str = ""
    page: int | None = None
    start: int = 0
    end: int = 0


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    chunks_written: int = 0
    vectors_written: int = 0
    chunks_total: int = 0
    documents_total: int = 0


def chunk_lang(text: str) -> str:
    """``zh`` when at least a fifth of the letters are Han characters, else ``en``."""
    han = sum(1 for ch in text if has_han(ch))
    letters = sum(1 for ch in text if ch.isalpha())
    return "zh" if letters and han / letters >= 0.2 else "en"


def _connect(path: str | Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=30, check_same_thread=False)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    return con


def _meta(con: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def _set_meta(con: sqlite3.Connection, **kv: Any) -> None:
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in kv.items()])


def open_index(path: str | Path) -> sqlite3.Connection:
    """The index at ``path`` opened for writing (created when missing). Refuses a file that is not a document
    index (a support index built by :func:`lmstack.rag.build_index`, or not SQLite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path)
    try:
        con.executescript(SCHEMA)
        meta = _meta(con)
    except sqlite3.DatabaseError as e:
        con.close()
        raise DataError(f"{path}: not an lmstack document index ({e})") from None
    if meta and (meta.get("kind") != KIND or meta.get("format") != FORMAT):
        con.close()
        raise DataError(f"{path}: not an lmstack document index (kind {meta.get('kind')!r}, format "
                        f"{meta.get('format')}); choose another --index path")
    if not meta:
        _set_meta(con, format=FORMAT, kind=KIND, analyzer=ANALYZER, chunks=0, documents=0)
        con.commit()
    return con


def _delete_doc(con: sqlite3.Connection, source: str) -> None:
    rowids = [r for (r,) in con.execute("SELECT rowid FROM chunks WHERE doc_id = ?", (source,))]
    for i in range(0, len(rowids), 500):
        part = rowids[i:i + 500]
        q = ",".join("?" * len(part))
        con.execute(f"DELETE FROM chunks_fts WHERE rowid IN ({q})", part)
        con.execute(f"DELETE FROM dense WHERE chunk_rowid IN ({q})", part)
    con.execute("DELETE FROM chunks WHERE doc_id = ?", (source,))
    con.execute("DELETE FROM documents WHERE source = ?", (source,))


def resolve_embedder(embedder: Any) -> tuple[Any, str | None]:
    """(model or None, name): "auto" is the packaged MiniLM when installed, else none; "none"/None: none; a
    path or the packaged name: that model; anything else: an already loaded model (its name "custom")."""
    from lmstack.rag.dense import DEFAULT_EMBEDDER, load_embedder

    if embedder is None or embedder == "none":
        return None, None
    if embedder == "auto":
        try:
            return load_embedder(DEFAULT_EMBEDDER), DEFAULT_EMBEDDER
        except ConfigError:
            return None, None
    if isinstance(embedder, (str, Path)):
        name = str(embedder) if str(embedder) == DEFAULT_EMBEDDER else str(Path(embedder).expanduser().resolve())
        return load_embedder(str(embedder)), name
    return embedder, getattr(embedder, "lmstack_name", "custom")


def index_documents(paths: Sequence[str | Path], index: str | Path, *, embedder: Any = "auto",
                    chunk_tokens: int = 256, overlap: int = 32, han: str = "bigram",
                    dense_langs: Sequence[str] | None | str = "default",
                    on_file: Callable[[str, str], None] | None = None, keep_others: bool = False,
                    prefix: str = "") -> IndexReport:
    """Bring the index at ``index`` up to date with the files under ``paths`` (see the module docstring).
    ``dense_langs``: the chunk languages embedded ("default": English only for the packaged MiniLM, which reads
    no Chinese, all languages for another model; None: all). ``on_file(source, status)`` is told each file's
    fate (added, updated, unchanged, failed: reason). ``prefix`` goes before each file's source name;
    ``keep_others``: documents not among ``paths`` stay (adding files) instead of being removed (a mirror)."""
    from lmstack.rag.dense import DEFAULT_EMBEDDER, encode

    if han not in HAN_MODES:
        raise ConfigError(f"han must be one of {', '.join(HAN_MODES)}, got {han!r}")
    if chunk_tokens < 8 or not 0 <= overlap < chunk_tokens:
        raise ConfigError(f"need chunk_tokens >= 8 and 0 <= overlap < chunk_tokens, got {chunk_tokens}, {overlap}")
    files = [(f, prefix + s) for f, s in find_files(list(paths))]
    con = open_index(index)
    try:
        meta = _meta(con)
        model, name = resolve_embedder(embedder)
        if dense_langs == "default":
            dense_langs = ["en"] if name == DEFAULT_EMBEDDER else None
        if model is None and meta.get("dense_model") and embedder == "auto":
            raise ConfigError(f"{index} was embedded with {meta['dense_model']}, which does not load here; "
                              "pass --embedder none to index without embeddings (that re-indexes every file)")
        settings = {"chunk_tokens": chunk_tokens, "overlap": overlap, "han": han, "dense_model": name,
                    "dense_langs": list(dense_langs) if dense_langs is not None else None}
        settings_key = json.dumps(settings, sort_keys=True)
        report = IndexReport()
        old = dict(con.execute("SELECT source, sha256 FROM documents").fetchall())
        seen = set()
        pending: list[tuple[str, str, Any, list[SourceChunk], list[SourceChunk]]] = []

        flushing = False

        def flush() -> None:
            """Embed the pending files' chunks in one batch, then write each file in its own transaction."""
            nonlocal flushing
            flushing = True
            texts = [f"{c.title}\n{c.text}" if c.title else c.text for p in pending for c in p[4]]
            all_vecs = encode(model, texts) if texts else None
            at = 0
            for source, digest, doc, chunks, emb in pending:
                vecs = all_vecs[at:at + len(emb)] if emb else None
                at += len(emb)
                with con:  # one transaction per file: an interrupted run keeps whole files only
                    _delete_doc(con, source)
                    for c in chunks:
                        cur = con.execute(
                            'INSERT INTO chunks(id, doc_id, lang, title, text, source, keywords, headings, page, '
                            'start, "end") VALUES (?,?,?,?,?,?,?,?,?,?,?)',
                            (c.id, c.doc_id, c.lang, c.title, c.text, c.source, "", c.headings, c.page, c.start,
                             c.end))
                        c.rowid = cur.lastrowid  # type: ignore[attr-defined]
                        con.execute("INSERT INTO chunks_fts(rowid, terms) VALUES (?, ?)",
                                    (c.rowid, " ".join(terms(f"{c.title}\n{c.text}", han))))  # type: ignore
                    if vecs is not None:
                        con.executemany("INSERT INTO dense VALUES (?, ?)",
                                        [(c.rowid, v.tobytes()) for c, v in zip(emb, vecs)])  # type: ignore
                        _set_meta(con, dense_dim=int(vecs.shape[1]))
                    con.execute("INSERT INTO documents VALUES (?,?,?,?,?)",
                                (source, digest, doc.title, doc.text, len(chunks)))
                (report.updated if source in old else report.added).append(source)
                report.chunks_written += len(chunks)
                report.vectors_written += len(emb)
                if on_file:
                    on_file(source, "updated" if source in old else "added")
            pending.clear()
            flushing = False

        try:
            for path, source in files:
                seen.add(source)
                try:
                    data = path.read_bytes()
                except OSError as e:
                    report.failed.append((source, f"cannot read ({e.strerror or e})"))
                    continue
                digest = hashlib.sha256(settings_key.encode() + b"\0" + data).hexdigest()
                if old.get(source) == digest:
                    report.unchanged.append(source)
                    if on_file:
                        on_file(source, "unchanged")
                    continue
                try:
                    doc = load_file(path, source)
                    pieces = chunk_blocks(doc.blocks, chunk_tokens, overlap)
                except DataError as e:
                    report.failed.append((source, str(e)))
                    if on_file:
                        on_file(source, f"failed: {e}")
                    continue
                except Exception as e:  # a parser's own bug on a hostile file: reported, the run goes on
                    report.failed.append((source, f"{path}: cannot parse ({type(e).__name__}: {e})"))
                    if on_file:
                        on_file(source, f"failed: {type(e).__name__}: {e}")
                    continue
                chunks = []
                for n, p in enumerate(pieces):
                    title = " > ".join([doc.title, *p.headings]) if doc.title else " > ".join(p.headings)
                    chunks.append(SourceChunk(id=f"{source}#{n}", doc_id=source, text=p.text, title=title,
                                              lang=chunk_lang(p.text), source=source, headings=" > ".join(p.headings),
                                              page=p.page, start=p.start, end=p.end))
                emb = [c for c in chunks if dense_langs is None or c.lang in dense_langs] if model is not None else []
                pending.append((source, digest, doc, chunks, emb))
                if sum(len(p[3]) for p in pending) >= EMBED_BATCH:
                    flush()
            flush()
        except BaseException:  # Ctrl-C / SIGTERM / an error while loading: keep the files already done
            if pending and not flushing:
                flush()
            raise
        with con:
            for source in sorted(set(old) - seen) if not keep_others else []:
                _delete_doc(con, source)
                report.removed.append(source)
            report.chunks_total = con.execute("SELECT count(*) FROM chunks").fetchone()[0]
            report.documents_total = con.execute("SELECT count(*) FROM documents").fetchone()[0]
            _set_meta(con, chunks=report.chunks_total, documents=report.documents_total, han=han,
                      chunk_tokens=chunk_tokens, overlap=overlap, dense_model=name, dense_langs=settings["dense_langs"])
            if name is None:
                con.execute("DELETE FROM dense")
    finally:
        con.close()
    return report


def index_chunks(chunks: Sequence[Chunk], path: str | Path, *, embedder: Any = None, dense_langs: Sequence[str] | None
                 = ("en",), embed_title: bool = False) -> dict[str, Any]:
    """Write a document index (the schema above, read by :class:`DocRetriever`) for chunks an application made
    itself (the support app's FAQ entries, product pages and policy sections), replacing ``path`` atomically
    (built beside it, then renamed: a reader never sees half an index). A chunk's ``keywords`` (other ways of
    asking, one a line) are searchable by BM25 and each line is one more vector of the chunk (its dense score
    is its best view's). ``embedder``: None (BM25 only), a name or directory (:func:`resolve_embedder`) or a
    loaded model; ``dense_langs``: the chunk languages embedded (None: all); ``embed_title``: embed
    ``title\\ntext`` as :func:`index_documents` does (default: the text alone). Returns the index's stats."""
    import os
    import tempfile

    from lmstack.rag.dense import encode
    from lmstack.rag.store import chunks_hash

    chunks = list(chunks)
    ids = [c.id for c in chunks]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise DataError(f"{path}: duplicate chunk ids {dup}")
    model, name = resolve_embedder(embedder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        con = open_index(tmp)
        try:
            n_terms, views = 0, []
            with con:
                for c in chunks:
                    cur = con.execute(
                        'INSERT INTO chunks(id, doc_id, lang, title, text, source, keywords, headings, page, start, '
                        '"end") VALUES (?,?,?,?,?,?,?,?,?,?,?)',
                        (c.id, c.doc_id, c.lang, c.title, c.text, c.source, c.keywords or "",
                         getattr(c, "headings", ""), getattr(c, "page", None), getattr(c, "start", 0),
                         getattr(c, "end", 0)))
                    t = " ".join(terms(" ".join(x for x in (c.title, c.text, c.keywords) if x)))
                    n_terms += len(t.split())
                    con.execute("INSERT INTO chunks_fts(rowid, terms) VALUES (?, ?)", (cur.lastrowid, t))
                    if model is not None and (dense_langs is None or c.lang in dense_langs):
                        views.append((cur.lastrowid, f"{c.title}\n{c.text}" if embed_title and c.title else c.text))
                        views.extend((cur.lastrowid, k) for k in (c.keywords or "").split("\n") if k.strip())
                docs: dict[str, int] = {}
                for c in chunks:
                    docs[c.doc_id] = docs.get(c.doc_id, 0) + 1
                con.executemany("INSERT INTO documents VALUES (?,?,?,?,?)",
                                [(d, "", "", "", n) for d, n in docs.items()])
                stats = {"format": FORMAT, "kind": KIND, "analyzer": ANALYZER, "chunks": len(chunks),
                         "documents": len(docs), "terms": n_terms, "chunks_sha256": chunks_hash(chunks),
                         "han": "bigram", "dense_model": None, "dense_langs": None, "vectors": 0}
                if views:
                    vecs = encode(model, [t for _, t in views])
                    con.executemany("INSERT INTO dense VALUES (?, ?)",
                                    [(r, v.tobytes()) for (r, _), v in zip(views, vecs)])
                    per = max(sum(1 for r, _ in views if r == x) for x in {r for r, _ in views})
                    stats.update(dense_model=name, dense_langs=list(dense_langs) if dense_langs is not None else None,
                                 dense_dim=int(vecs.shape[1]), dense_views=per, vectors=len(views))
                _set_meta(con, **stats)
            con.execute("PRAGMA journal_mode = DELETE")  # one self-contained file (a bundle may be read-only)
        finally:
            con.close()
        for suffix in ("-wal", "-shm"):
            Path(tmp + suffix).unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        for suffix in ("", "-wal", "-shm"):
            Path(tmp + suffix).unlink(missing_ok=True)
        raise
    return stats


def open_retriever(path: str | Path, embedder: Any = "auto", **kw: Any) -> Any:
    """A retriever for an index file: :class:`DocRetriever` for a document index (what :func:`index_documents`
    and :func:`index_chunks` write); an index of the older whole-file format (:func:`lmstack.rag.build_index`,
    bundles written before the support app moved onto the document index) opens read-only in
    :class:`lmstack.rag.Retriever`, which answers the same ``search(query, k, lang=...)``."""
    path = Path(path)
    if path.is_file():
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                kind = _meta(con).get("kind")
            finally:
                con.close()
        except sqlite3.DatabaseError:
            kind = KIND  # DocRetriever reports it in one line
        if kind != KIND:
            from lmstack.rag.store import Retriever

            return Retriever(path, embedder=embedder)
    return DocRetriever(path, embedder=embedder, **kw)


class DocRetriever:
    """Search a document index: BM25, dense (exact cosine; an ANN index above ``ann_above`` vectors when
    ``usearch`` is installed; ``store``: exact, usearch or qdrant at ``store_location``, see
    :mod:`lmstack.rag.vectors`) or hybrid by reciprocal-rank fusion, with filters on language and source.

    ``embedder``: "auto" loads the model the index was embedded with; None: BM25 only; or a loaded model."""

    CANDIDATES = 50  # per ranking, before fusion

    def __init__(self, path: str | Path, embedder: Any = "auto", *, ann_above: int = 100_000, store: str = "auto",
                 store_location: str = ":memory:", candidates: int | None = None, reranker: Any = None,
                 rerank_depth: int = 20):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: index not found (build it with `lmstack rag index --docs DIR "
                            f"--index {self.path}`)")
        try:
            self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self.meta = _meta(self.con)
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not an lmstack document index ({e})") from None
        if self.meta.get("kind") != KIND:
            raise DataError(f"{self.path}: not an lmstack document index (build it with `lmstack rag index`)")
        self.han = self.meta.get("han", "bigram")
        if candidates is not None:
            self.CANDIDATES = int(candidates)
        # a second stage over the first stage's top `rerank_depth` (lmstack.rag.rerankers); None: off
        self.reranker, self.rerank_depth = reranker, int(rerank_depth)
        self.embedder, self.vectors = None, None
        self.ann_above, self.store, self.store_location = ann_above, store, store_location
        if self.meta.get("dense_model") and embedder is not None:
            from lmstack.rag.dense import load_embedder

            self.embedder = load_embedder(self.meta["dense_model"]) if embedder == "auto" else embedder
            self.embedder.lmstack_name = self.meta["dense_model"]  # re-indexing with it keeps the index's name
            self.reload_vectors()

    def reload_vectors(self) -> None:
        """Read the vectors into memory (after the index changed under a long-running reader)."""
        from lmstack.rag.vectors import make_store

        dim = int(self.meta.get("dense_dim") or 0)
        rows = self.con.execute("SELECT chunk_rowid, vec FROM dense ORDER BY chunk_rowid").fetchall()
        ids = np.array([r for r, _ in rows], dtype=np.int64)
        vecs = (np.frombuffer(b"".join(v for _, v in rows), dtype=np.float32).reshape(len(rows), dim)
                if rows else np.zeros((0, max(dim, 1)), np.float32))
        self.vectors = make_store(ids, vecs, ann_above=self.ann_above, kind=self.store, location=self.store_location)

    def refresh(self) -> None:
        self.meta = _meta(self.con)
        if self.embedder is not None:
            self.reload_vectors()

    def __len__(self) -> int:
        return int(self.meta.get("chunks", 0))

    def covers(self, lang: str) -> bool:
        langs = self.meta.get("dense_langs")
        return self.vectors is not None and (langs is None or lang in langs)

    def _where(self, lang: str | None, source: str | None) -> tuple[str, list[Any]]:
        sql, args = "", []
        if lang:
            sql += " AND c.lang = ?"
            args.append(lang)
        if source:
            sql += " AND c.source GLOB ?"
            args.append(source)
        return sql, args

    def bm25(self, query: str, n: int, lang: str | None = None, source: str | None = None) -> list[tuple[int, float]]:
        seen = list(dict.fromkeys(terms(query, self.han)))
        if not seen or n <= 0:
            return []
        expr = " OR ".join('"' + t.replace('"', '""') + '"' for t in seen)
        where, args = self._where(lang, source)
        sql = ("SELECT c.rowid, bm25(chunks_fts) AS s FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
               f"WHERE chunks_fts MATCH ?{where} ORDER BY s, c.rowid LIMIT ?")
        return [(int(r), -float(s)) for r, s in self.con.execute(sql, [expr, *args, n]).fetchall()]

    def dense(self, query: str, n: int, lang: str | None = None, source: str | None = None) -> list[tuple[int, float]]:
        from lmstack.rag.dense import encode

        if self.vectors is None or n <= 0:
            return []
        q = encode(self.embedder, [query])[0]
        views = max(1, int(self.meta.get("dense_views") or 1))  # vectors per chunk (index_chunks' keyword lines)
        want = n * views if not (lang or source) else n * max(views, 8)
        ranked = self.vectors.search(q, want)
        if views > 1:  # a chunk's score is its best view's: keep each chunk's first (best) row
            seen: set[int] = set()
            ranked = [(r, s) for r, s in ranked if not (r in seen or seen.add(r))]
        if lang or source:
            keep = self._filter([r for r, _ in ranked], lang, source)
            ranked = [(r, s) for r, s in ranked if r in keep]
        return ranked[:n]

    def similarities(self, query_vec: np.ndarray, rowids: Sequence[int]) -> dict[int, float]:
        """``{chunk rowid: cosine}`` of ``query_vec`` (L2-normalised) with those chunks' stored vectors (best
        view), read from the index whatever the vector store; chunks without a vector are left out."""
        if not rowids:
            return {}
        q = ",".join("?" * len(rowids))
        rows = self.con.execute(f"SELECT chunk_rowid, vec FROM dense WHERE chunk_rowid IN ({q})", list(rowids)).fetchall()
        out: dict[int, float] = {}
        for r, v in rows:
            s = float(np.frombuffer(v, dtype=np.float32) @ np.asarray(query_vec, dtype=np.float32))
            out[int(r)] = max(s, out.get(int(r), -2.0))
        return out

    def _filter(self, rowids: list[int], lang: str | None, source: str | None) -> set[int]:
        if not rowids:
            return set()
        q = ",".join("?" * len(rowids))
        rows = self.con.execute(f"SELECT rowid, lang, source FROM chunks WHERE rowid IN ({q})", rowids).fetchall()
        return {r for r, lg, src in rows if (not lang or lg == lang) and (not source or fnmatch.fnmatchcase(src, source))}

    def search(self, query: str, k: int = 5, *, mode: str = "hybrid", lang: str | None = None,
               source: str | None = None, rerank: bool | None = None) -> list[Hit]:
        """The ``k`` best chunks, best first. ``mode``: hybrid (BM25 + dense by reciprocal-rank fusion, for
        query languages the index has vectors for; BM25 alone otherwise), bm25 or dense. ``lang``: only chunks
        in that language; ``source``: only chunks of sources matching that glob (``manuals/*.pdf``).
        ``rerank`` (default: whether the retriever has a ``reranker``): reorder the first stage's top
        ``rerank_depth`` with the reranker, whose score becomes the hit's."""
        if rerank is None:
            rerank = self.reranker is not None
        if rerank:
            if self.reranker is None:
                raise ConfigError("rerank needs a reranker (DocRetriever(..., reranker=load_reranker(...)))")
            first = self.search(query, max(k, self.rerank_depth), mode=mode, lang=lang, source=source, rerank=False)
            return self.reranker.rerank(query, first, k, retriever=self)
        return self._search(query, k, mode=mode, lang=lang, source=source)

    def _search(self, query: str, k: int, *, mode: str, lang: str | None, source: str | None) -> list[Hit]:
        from lmstack.rag.dense import rrf

        if mode not in ("hybrid", "bm25", "dense"):
            raise ConfigError(f"mode must be hybrid, bm25 or dense, got {mode!r}")
        if k <= 0 or not query.strip():
            return []
        if mode == "dense" or (mode == "hybrid" and self.covers(lang or query_lang(query))):
            dense = self.dense(query, max(k, self.CANDIDATES), lang, source)
            if mode == "dense":
                ranked = dense[:k]
            else:
                lexical = self.bm25(query, max(k, self.CANDIDATES), lang, source)
                ranked = rrf([[r for r, _ in lexical], [r for r, _ in dense]])[:k]
        else:
            ranked = self.bm25(query, k, lang, source)
        chunks = self.chunks([r for r, _ in ranked])
        return [Hit(chunks[r], s, i + 1) for i, (r, s) in enumerate(ranked) if r in chunks]

    def chunks(self, rowids: list[int]) -> dict[int, SourceChunk]:
        if not rowids:
            return {}
        q = ",".join("?" * len(rowids))
        rows = self.con.execute('SELECT rowid, id, doc_id, text, title, lang, source, keywords, headings, page, '
                                f'start, "end" FROM chunks WHERE rowid IN ({q})', rowids).fetchall()
        return {int(r[0]): SourceChunk(*r[1:]) for r in rows}

    def get(self, chunk_id: str) -> SourceChunk | None:
        row = self.con.execute("SELECT rowid FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        return self.chunks([int(row[0])]).get(int(row[0])) if row else None

    def document_text(self, source: str) -> str | None:
        row = self.con.execute("SELECT text FROM documents WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.con.close()
