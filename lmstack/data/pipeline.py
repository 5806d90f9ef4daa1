"""The data pipeline: read -> (per-document steps in a process pool) -> exact + near dedup -> mix -> write.

Two phases, so one job can be split across machines:

1. :func:`run_shard` (``--shard i/n``): read this shard's share of the inputs (whole files when there are at
   least ``n`` files, else every n-th record), run normalize / language / quality / blocklist / PII in a
   ``multiprocessing`` pool over document batches (results kept in input order), and write a staging
   directory ``<out>/_staging/shard-IIIII-of-NNNNN/`` with the surviving documents, their exact-dedup keys and
   MinHash signatures (flat binary arrays, so memory stays bounded) and the step statistics.
2. :func:`merge_shards`: one pass over the keys and signatures of *all* shards: exact dedup, banded MinHash
   LSH near dedup (:mod:`lmstack.data.minhash`), mixing; then a k-way merge of the shards' documents in input
   order into ``<out>/data.jsonl`` plus ``report.json`` / ``report.html`` (and token shards when asked).

Documents are ordered by (input file, record) everywhere, so the first of a duplicate group is the same
whatever the number of shards or workers. :func:`run_pipeline` does both phases (or phase 1 with a shard).
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from lmstack._version import __version__
from lmstack.config import load_config, save_config
from lmstack.data.config import DataPipelineConfig
from lmstack.data.minhash import exact_duplicates, near_duplicates
from lmstack.data.mix import mix_rates, repeats
from lmstack.data.readers import ReadStats, expand_inputs, iter_file
from lmstack.data.report import HIST_EDGES, length_hist, write_report
from lmstack.data.steps import (
    STEP_ORDER, StepStats, init_pool_worker, init_worker, load_blocklist, process_batch, snippet,
)
from lmstack.errors import ConfigError, DataError
from lmstack.utils.io import atomic_dir, atomic_write, file_sha256, iter_jsonl, read_json, remove_stale_temps
from lmstack.utils.progress import progress

STAGING = "_staging"
OUTPUT = "data.jsonl"


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if spec is None:
        return 0, 1
    if isinstance(spec, tuple):
        i, n = spec
    else:
        try:
            i, n = (int(x) for x in str(spec).split("/"))
        except ValueError:
            raise ConfigError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {i}/{n}: need 0 <= i < n")
    return i, n


def _resolve(cfg: DataPipelineConfig) -> list[tuple[int, str, Path, str, Any]]:
    """All input files up front (fails before any work): (file index, source name, path, rel, input cfg)."""
    files = []
    for k, inp in enumerate(cfg.inputs):
        name = inp.name or Path(inp.path.split("*")[0].rstrip("/") or "input").name.split(".")[0] or f"input{k}"
        for path, rel in expand_inputs(inp.path, where=f"inputs[{k}].path"):
            files.append((len(files), name, path, rel, inp))
    return files


def _source_names(cfg: DataPipelineConfig) -> list[str]:
    return list(dict.fromkeys(name for _, name, *_ in _resolve(cfg)))


def iter_records(cfg: DataPipelineConfig, shard: tuple[int, int], stats: ReadStats,
                 files: list | None = None) -> Iterator[dict[str, Any]]:
    """This shard's records as dicts, each with ``pos`` = (file index << 32) | record number in the file."""
    i, n = shard
    files = files if files is not None else _resolve(cfg)
    by_file = len(files) >= n
    for fidx, name, path, rel, inp in files:
        if by_file and fidx % n != i:
            continue
        st = stats if by_file else ReadStats(strict=stats.strict)  # record mode: every shard reads the file,
        recs = iter_file(path, rel, name, inp.text_field, st, inp.txt_mode, tuple(inp.keep_fields),  # shard 0 reports
                         max_record_bytes=cfg.max_record_bytes)
        for k, rec in enumerate(recs):
            if not by_file and (fidx + k) % n != i:
                continue
            if not by_file:
                stats.records += 1
            yield {"pos": (fidx << 32) | k, "id": rec.id, "text": rec.text, "source": name, "path": rec.path,
                   "line": rec.line, "html": rec.html, "meta": rec.meta}
        if not by_file and i == 0:
            st.records = 0  # counted above, per shard
            stats.merge(st)


def _batched(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_pool_map(fn, batches: Iterator[list], workers: int, initargs: tuple) -> Iterator:
    """Like ``Pool.imap`` (results in input order) but with at most 2*workers batches in flight (bounded memory)."""
    if workers <= 1:
        init_worker(*initargs)
        for b in batches:
            yield fn(b)
        return
    # fork like torch DataLoader workers (lmstack.utils imports torch, but no torch threads run here)
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=init_pool_worker, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(fn, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _shard_dir(out_dir: Path, i: int, n: int) -> Path:
    return out_dir / STAGING / f"shard-{i:05d}-of-{n:05d}"


def _dedup_fingerprint(cfg: DataPipelineConfig) -> str:
    d = cfg.model_dump(mode="json")
    d.pop("workers"), d.pop("batch_size"), d.pop("out_dir"), d.pop("mix"), d.pop("tokenize")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_shard(cfg: DataPipelineConfig, out_dir: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Phase 1 on shard ``i`` of ``n``: per-document steps; writes the shard's staging directory."""
    i, n = parse_shard(shard)
    out_dir = Path(out_dir)
    files = _resolve(cfg)  # missing inputs fail here, before any work
    blockwords = load_blocklist(cfg.blocklist) if cfg.blocklist.enabled else []
    workers = cfg.workers or os.cpu_count() or 1
    num_perm = cfg.dedup.num_perm
    sources = _source_names(cfg)
    src_idx = {s: k for k, s in enumerate(sources)}
    read = ReadStats(strict=cfg.strict)
    steps = {k: StepStats(k) for k in STEP_ORDER[1:6]}
    hist_in = np.zeros(len(length_hist([])), dtype=np.int64)
    t0 = time.time()
    n_docs = 0
    created_by = f"lmstack {__version__}"
    remove_stale_temps(out_dir / STAGING)  # a shard killed while writing leaves .shard-*.tmp-PID
    with atomic_dir(_shard_dir(out_dir, i, n)) as tmp, progress() as bar:
        task = bar.add_task(f"clean shard {i}/{n}" if n > 1 else "clean", total=None)
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as fdocs, open(tmp / "pos.bin", "wb") as fpos, \
                open(tmp / "exact.bin", "wb") as fexact, open(tmp / "src.bin", "wb") as fsrc, \
                open(tmp / "nchars.bin", "wb") as fnch, open(tmp / "sig.bin", "wb") as fsig:

            def batches():
                for b in _batched(iter_records(cfg, (i, n), read, files), cfg.batch_size):
                    hist_in[:] += length_hist([len(r["text"]) for r in b])
                    yield b

            initargs = (cfg.model_dump_json(), blockwords, True)
            for docs, bstats in _ordered_pool_map(process_batch, batches(), workers, initargs):
                for k, d in bstats.items():
                    steps[k].merge(StepStats.from_dict(d), cfg.examples)
                if docs:
                    np.array([d["pos"] for d in docs], dtype=np.int64).tofile(fpos)
                    np.array([d.pop("exact_key") for d in docs], dtype=np.uint64).tofile(fexact)
                    np.array([src_idx[d["source"]] for d in docs], dtype=np.int32).tofile(fsrc)
                    np.array([len(d["text"]) for d in docs], dtype=np.int64).tofile(fnch)
                    if cfg.dedup.near:
                        np.stack([d.pop("sig") for d in docs]).astype(np.uint32).tofile(fsig)
                    for d in docs:
                        d.pop("html", None)
                        d.pop("pos", None)
                        d["created_by"] = created_by
                        fdocs.write(json.dumps(d, ensure_ascii=False) + "\n")
                n_docs += len(docs)
                bar.advance(task, bstats["normalize"]["docs_in"])
        summary = {"shard": [i, n], "documents": n_docs, "num_perm": num_perm if cfg.dedup.near else 0,
                   "fingerprint": _dedup_fingerprint(cfg), "sources": sources, "read": read.to_dict(),
                   "steps": {k: v.to_dict() for k, v in steps.items()}, "hist_in": hist_in.tolist(),
                   "elapsed_s": time.time() - t0}
        with atomic_write(tmp / "summary.json") as f:
            json.dump(summary, f, ensure_ascii=False)
        save_config(cfg, tmp / "config.yaml")  # lets `lmstack data merge --out DIR` run without --config
    return summary


def _load_shards(cfg: DataPipelineConfig, out_dir: Path) -> tuple[int, list[Path], list[dict]]:
    root = out_dir / STAGING
    dirs = sorted(root.glob("shard-*-of-*")) if root.is_dir() else []
    if not dirs:
        raise DataError(f"{root}: no shard outputs; run `lmstack data run --shard i/n` for every shard first")
    n = int(dirs[0].name.rsplit("-", 1)[1])
    want = [_shard_dir(out_dir, i, n) for i in range(n)]
    missing = [p.name for p in want if not (p / "summary.json").is_file()]
    if missing:
        raise DataError(f"{root}: missing shard outputs {missing[:5]} of {n}; run those shards, then merge again")
    sums = [read_json(p / "summary.json") for p in want]
    fp = _dedup_fingerprint(cfg)
    for p, s in zip(want, sums):
        if s["fingerprint"] != fp:
            raise DataError(f"{p}: made with a different pipeline config; rerun that shard with this config")
    return n, want, sums


def _signatures(dirs: list[Path], num_perm: int, out_dir: Path) -> np.ndarray:
    """All shards' MinHash signatures as one read-only memmap (N, num_perm) uint32 (concatenated on disk)."""
    if len(dirs) == 1:
        path = dirs[0] / "sig.bin"
    else:
        path = out_dir / STAGING / "all_sig.bin"
        with open(path, "wb") as out:
            for d in dirs:
                with open(d / "sig.bin", "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    return np.memmap(path, dtype=np.uint32, mode="r").reshape(-1, num_perm)


def _dup_pairs(is_near: np.ndarray, roots: np.ndarray, sigs: np.ndarray, limit: int = 1000
               ) -> list[tuple[int, int, float]]:
    """Report examples for decisions made elsewhere, as :func:`near_duplicates` gives them: (dup row, the kept row
    of its group, estimated Jaccard) for the first ``limit`` duplicates in row order."""
    return [(int(j), int(roots[j]), float(np.mean(np.asarray(sigs[j]) == np.asarray(sigs[roots[j]]))))
            for j in np.flatnonzero(is_near)[:limit]]


def merge_shards(cfg: DataPipelineConfig, out_dir: str | os.PathLike, keep_staging: bool = True,
                 decide: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
                 ) -> dict[str, Any]:
    """Phase 2: global exact + near dedup and mixing over all shards; writes data.jsonl and the report.

    ``decide(pos)`` -> (is_exact, is_near, roots): (N,) bool, (N,) bool and (N,) int64 (the kept row of each near
    duplicate's group) over the staged rows whose input positions are ``pos`` (N,): dedup decisions made elsewhere (the Ray executor, :mod:`lmstack.data.ray_exec`) instead of here."""
    t0 = time.time()
    out_dir = Path(out_dir)
    remove_stale_temps(out_dir)  # left by a merge killed while writing (SIGKILL)
    n, dirs, sums = _load_shards(cfg, out_dir)
    counts = [s["documents"] for s in sums]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    pos = np.concatenate([np.fromfile(d / "pos.bin", dtype=np.int64) for d in dirs]) if total else np.zeros(0, np.int64)
    order = np.argsort(pos, kind="stable")          # global input order
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total)                  # row -> priority (0 = first in input)
    src = np.concatenate([np.fromfile(d / "src.bin", dtype=np.int32) for d in dirs]) if total else np.zeros(0, np.int32)
    nch = np.concatenate([np.fromfile(d / "nchars.bin", dtype=np.int64) for d in dirs]) if total else np.zeros(0, np.int64)

    exact = StepStats("exact_dedup")
    exact.docs_in = total
    exact.chars_in = int(nch.sum())
    is_exact = np.zeros(total, dtype=bool)
    if decide is not None and total:
        is_exact, is_near_given, roots = decide(pos)
    elif cfg.dedup.exact and total:
        keys = np.concatenate([np.fromfile(d / "exact.bin", dtype=np.uint64) for d in dirs])
        is_exact[order] = exact_duplicates(keys[order])
    exact.removed["exact_duplicate"] = int(is_exact.sum())
    exact.docs_out = total - int(is_exact.sum())
    exact.chars_out = int(nch[~is_exact].sum())

    near = StepStats("near_dedup")
    near.docs_in, near.chars_in = exact.docs_out, exact.chars_out
    is_near = np.zeros(total, dtype=bool)
    pairs: list[tuple[int, int, float]] = []
    if cfg.dedup.near and total:
        sigs = _signatures(dirs, sums[0]["num_perm"], out_dir)
        if decide is not None:
            is_near, pairs_unsorted = is_near_given, _dup_pairs(is_near_given, roots, sigs)
        else:
            is_near, pairs_unsorted = near_duplicates(sigs, cfg.dedup.threshold, active=~is_exact,
                                                      seed=cfg.dedup.seed, priority=rank)
        del sigs
        pairs = sorted(pairs_unsorted, key=lambda p: rank[p[0]])
    near.removed["near_duplicate"] = int(is_near.sum())
    keep = ~(is_exact | is_near)
    near.docs_out, near.chars_out = int(keep.sum()), int(nch[keep].sum())

    sources = sums[0]["sources"]
    mix = StepStats("mix")
    mix.docs_in, mix.chars_in = near.docs_out, near.chars_out
    rates = None
    if cfg.mix.enabled:
        weights = {}
        for inp in cfg.inputs:  # same naming rule as _resolve
            for _, name, *_ in _resolve(cfg.model_copy(update={"inputs": [inp]})):
                weights[name] = inp.weight
        sdocs = {s: int(((src == k) & keep).sum()) for k, s in enumerate(sources)}
        schars = {s: int(nch[(src == k) & keep].sum()) for k, s in enumerate(sources)}
        rates = mix_rates(sdocs, schars, weights, cfg.mix)

    # write data.jsonl: k-way merge of the shards' docs in input order
    example_dups = {a: (b, j) for a, b, j in pairs[: max(cfg.examples, 0) * 4]}
    example_kept = {b for b, _ in example_dups.values()}
    kept_ids: dict[int, str] = {}
    hist_out = np.zeros_like(np.asarray(sums[0]["hist_in"]))
    out_path = out_dir / OUTPUT
    n_out = chars_out = 0

    def stream(k: int):
        with open(dirs[k] / "docs.jsonl", encoding="utf-8") as f:
            for local, line in enumerate(f):
                yield int(offsets[k] + local), line

    def keyed(k: int):
        for row, line in stream(k):
            yield int(rank[row]), row, line

    with atomic_write(out_path) as fout, progress() as bar:
        task = bar.add_task("merge", total=total)
        lens = []
        for _, row, line in heapq.merge(*(keyed(k) for k in range(n))):
            bar.advance(task)
            if row in example_kept:
                kept_ids[row] = json.loads(line)["id"]
            if not keep[row]:
                if is_exact[row] and len(exact.examples.get("exact_duplicate", [])) < cfg.examples:
                    d = json.loads(line)
                    exact.example("exact_duplicate", f"{d['id']}: {snippet(d['text'])}", cfg.examples)
                elif row in example_dups:
                    d = json.loads(line)
                    kept, j = example_dups[row]
                    near.example("near_duplicate", f"{d['id']} ~ {kept_ids.get(kept, '?')} (est. Jaccard {j:.2f}): "
                                 f"{snippet(d['text'])}", cfg.examples)
                continue
            reps = 1
            if rates is not None:
                d = json.loads(line)
                reps = repeats(d["id"], rates.get(d["source"], 0.0), cfg.mix.seed)
                if reps == 0:
                    mix.removed[f"sampled_out:{d['source']}"] += 1
                    continue
                if reps > 1:
                    mix.changed[f"repeated:{d['source']}"] += reps - 1
            for _ in range(reps):
                fout.write(line)  # already in final form (written by run_shard)
            n_out += reps
            chars_out += reps * int(nch[row])
            lens.extend([int(nch[row])] * reps)
            if len(lens) >= 65536:
                hist_out += length_hist(lens)
                lens.clear()
        hist_out += length_hist(lens)
    mix.docs_out, mix.chars_out = n_out, chars_out

    # assemble the report
    read = ReadStats(strict=cfg.strict)
    steps = {k: StepStats(k) for k in STEP_ORDER[1:6]}
    hist_in = np.zeros_like(hist_out)
    for s in sums:
        rs = s["read"]
        read.merge(ReadStats(rs["files"], rs["records"], rs["bytes"], collections.Counter(rs["problems"]),
                             rs["examples"]))
        for k, d in s["steps"].items():
            steps[k].merge(StepStats.from_dict(d), cfg.examples)
        hist_in += np.asarray(s["hist_in"])
    read_step = StepStats("read", docs_in=read.records + sum(read.problems.values()), docs_out=read.records,
                          chars_in=steps["normalize"].chars_in, chars_out=steps["normalize"].chars_in,
                          removed=collections.Counter(read.problems))
    all_steps = [read_step, *steps.values()] + ([exact] if cfg.dedup.exact else []) + ([near] if cfg.dedup.near else [])
    if cfg.mix.enabled:
        all_steps.append(mix)
    report = {
        "output": str(out_path), "documents": n_out, "shards": n,
        "totals": {"docs_in": read.records, "docs_out": n_out, "chars_in": steps["normalize"].chars_in,
                   "chars_out": chars_out},
        "read": read.to_dict(),
        "steps": [s.to_dict() for s in all_steps],
        "mix_rates": rates,
        "histograms": {"input": hist_in.tolist(), "output": hist_out.tolist()},
        "histogram_edges": [float(x) for x in HIST_EDGES],
        "elapsed_s": sum(s["elapsed_s"] for s in sums) + (time.time() - t0),
        "created_by": f"lmstack {__version__}",
    }
    if cfg.tokenize.enabled:
        report["tokens"] = _tokenize(cfg, out_dir, out_path, n_out)
    save_config(cfg, out_dir / "config.yaml")
    write_report(report, out_dir)
    if not keep_staging:
        shutil.rmtree(out_dir / STAGING, ignore_errors=True)
    return report


def iter_jsonl_texts(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The texts of a JSONL file this pipeline wrote (lmstack.utils.io.iter_jsonl: a bad line is an error)."""
    return (rec[text_field] for rec in iter_jsonl(path))


def _tokenize(cfg: DataPipelineConfig, out_dir: Path, data_path: Path, n_docs: int) -> dict[str, Any]:
    from lmstack.data.shards import write_shards
    from lmstack.tokenizer import Tokenizer

    t = cfg.tokenize
    tok = Tokenizer.from_dir(t.tokenizer)
    tok_out = Path(t.out_dir) if t.out_dir else out_dir / "tokens"
    sources = [{"path": str(data_path), "sha256": file_sha256(data_path), "documents": n_docs}]
    index = write_shards(iter_jsonl_texts(data_path), tok, tok_out, val_fraction=t.val_fraction,
                         val_documents=t.val_documents, shard_tokens=t.shard_tokens, seed=t.seed, sources=sources,
                         tokenizer_dir=str(t.tokenizer), progress_total=n_docs)
    return {"dir": str(tok_out), "train_tokens": index["splits"]["train"]["tokens"],
            "val_tokens": index["splits"]["val"]["tokens"]}


def load_pipeline_config(cfg: DataPipelineConfig | str | os.PathLike | dict, overrides: Sequence[str] = ()
                         ) -> DataPipelineConfig:
    if isinstance(cfg, DataPipelineConfig):
        if overrides:
            from lmstack.config import apply_overrides, validate

            return validate(DataPipelineConfig, apply_overrides(cfg.model_dump(mode="json"), overrides))
        return cfg
    if isinstance(cfg, dict):
        from lmstack.config import apply_overrides, validate

        return validate(DataPipelineConfig, apply_overrides(dict(cfg), overrides))
    return load_config(DataPipelineConfig, cfg, overrides)


EXECUTORS = ("local", "ray")


def run_pipeline(cfg: DataPipelineConfig | str | os.PathLike | dict, out_dir: str | os.PathLike | None = None,
                 shard: str | tuple[int, int] | None = None, overrides: Sequence[str] = (), executor: str = "local",
                 ray_address: str | None = None) -> dict[str, Any]:
    """Run the pipeline. Without ``shard``: both phases, returns the report dict (also in report.json).
    With ``shard="i/n"``: phase 1 for that shard only, returns its summary; then call :func:`merge_shards`.
    ``executor="ray"``: the same steps as Ray Data operations (:mod:`lmstack.data.ray_exec`), same output;
    ``ray_address`` a running cluster (``auto``, ``HOST:6379``), else a local Ray with ``workers`` CPUs."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if executor == "ray" and shard is not None:
        raise ConfigError("--shard is for the local executor; Ray partitions the work itself (drop --shard)")
    if ray_address and executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    cfg = load_pipeline_config(cfg, overrides)
    out = out_dir or cfg.out_dir
    if not out:
        raise ConfigError("no output directory: pass out_dir (CLI: --out) or set out_dir in the config")
    out = Path(out)
    _resolve(cfg)  # validate inputs before any work
    if cfg.tokenize.enabled and not (Path(cfg.tokenize.tokenizer) / "tokenizer.json").is_file():
        raise ConfigError(f"tokenize.tokenizer: {cfg.tokenize.tokenizer} has no tokenizer.json")
    if executor == "ray":
        from lmstack.data.ray_exec import run_ray

        return run_ray(cfg, out, address=ray_address)
    if shard is not None:
        i, n = parse_shard(shard)
        return run_shard(cfg, out, (i, n))
    if (out / STAGING).exists():
        shutil.rmtree(out / STAGING)
    run_shard(cfg, out, (0, 1))
    return merge_shards(cfg, out, keep_staging=False)


def merge_output(cfg: DataPipelineConfig | str | os.PathLike | dict | None, out_dir: str | os.PathLike | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Phase 2 for a sharded run (``lmstack data merge``). ``cfg=None``: the config the shards were run with."""
    if cfg is None:
        if not out_dir:
            raise ConfigError("merge needs --out (the directory the shards wrote to) or --config")
        saved = sorted((Path(out_dir) / STAGING).glob("shard-*-of-*/config.yaml"))
        if not saved:
            raise DataError(f"{Path(out_dir) / STAGING}: no shard outputs; run the shards with --shard i/n first")
        cfg = saved[0]
    cfg = load_pipeline_config(cfg, overrides)
    out = out_dir or cfg.out_dir
    if not out:
        raise ConfigError("no output directory: pass out_dir (CLI: --out) or set out_dir in the config")
    return merge_shards(cfg, Path(out))
