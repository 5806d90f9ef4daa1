"""The data pipeline on Ray Data (``lmstack data run --executor ray [--ray-address ADDR]``).

The same steps as the local executor (:mod:`lmstack.data.pipeline`), as Ray Data operations:

1. ``read``: one task per input file (:func:`read_file_batches`, the local reader), records in batches;
2. ``map_batches``: normalize -> language -> quality -> blocklist -> PII, exact key and MinHash signature
   (:func:`process_rows`, the local :class:`~lmstack.data.steps.DocProcessor`);
3. exact dedup: ``groupby(exact key).min(position)`` — the first document of each key (input order) is kept;
4. near dedup: ``flat_map`` each document to its LSH band buckets (:func:`band_rows`), ``groupby(band, bucket)
   .map_groups`` compares the members of each bucket (:func:`bucket_edges`, the local rule: each member against
   the 32 before it in input order, estimated Jaccard >= threshold); the driver joins the confirmed pairs into
   groups (union-find; the first document of a group is kept).

Decisions are global, so duplicates in different partitions (files, blocks, workers) are found as they are by the
local executor; then the driver writes the staging directory and :func:`~lmstack.data.pipeline.merge_shards`
writes ``data.jsonl`` and the report with the decisions from Ray — the same bytes as ``--executor local``.

Ray is optional (``pip install 'lmstack[ray]'``). On a cluster (``ray start --head`` on one machine,
``ray start --address HEAD:6379`` on the others) pass ``--ray-address auto`` (or ``HEAD:6379``); every node must
see the input paths, and only the driver writes the output.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmstack._version import __version__
from lmstack.data.config import DataPipelineConfig
from lmstack.data.minhash import band_keys, band_multipliers, bucket_pairs, components, optimal_bands
from lmstack.data.readers import ReadStats
from lmstack.data.report import length_hist
from lmstack.data.steps import STEP_ORDER, DocProcessor, StepStats, load_blocklist
from lmstack.errors import ConfigError, DataError

MAX_COMPARE = 32  # the local rule (lmstack.data.minhash.near_duplicates' default)


def _i64(x: np.ndarray) -> np.ndarray:
    """uint64 keys as int64 bits (Arrow groups on them as on any integer)."""
    return np.ascontiguousarray(x, dtype=np.uint64).view(np.int64)


# ---- the per-partition functions (pure: tested without Ray in tests/test_data_ray.py) ---------------------

def read_file_batches(cfg_json: str, file: tuple, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One input file -> record batches {pos, rec (JSON), stats ("")}, then one batch with its ReadStats."""
    from lmstack.data.pipeline import iter_records

    cfg = DataPipelineConfig.model_validate_json(cfg_json)
    stats = ReadStats(strict=cfg.strict)
    pos: list[int] = []
    recs: list[str] = []
    for rec in iter_records(cfg, (0, 1), stats, files=[tuple(file)]):
        pos.append(rec["pos"])
        recs.append(json.dumps(rec, ensure_ascii=False))
        if len(pos) >= batch_size:
            yield {"pos": np.array(pos, np.int64), "rec": np.array(recs, object), "stats": np.array([""] * len(pos), object)}
            pos, recs = [], []
    if pos:
        yield {"pos": np.array(pos, np.int64), "rec": np.array(recs, object), "stats": np.array([""] * len(pos), object)}
    yield {"pos": np.array([-1], np.int64), "rec": np.array([""], object),
           "stats": np.array([json.dumps({"read": stats.to_dict()})], object)}


_PROCESSORS: dict[str, DocProcessor] = {}


def process_rows(batch: dict[str, np.ndarray], cfg_json: str, blockwords: list[str], sources: list[str]
                 ) -> dict[str, np.ndarray]:
    """Per-document steps over a batch of read rows. Out: one row per kept document {pos, doc (the output line),
    exact (int64 bits), nchars, src, sig (bytes)} plus one stats row (pos -1) with the step statistics, the
    input length histogram and any ReadStats rows passed through."""
    proc = _PROCESSORS.get(cfg_json)
    if proc is None:
        proc = _PROCESSORS[cfg_json] = DocProcessor(DataPipelineConfig.model_validate_json(cfg_json), blockwords)
    src_idx = {s: k for k, s in enumerate(sources)}
    created_by = f"lmstack {__version__}"
    stats = proc.new_stats()
    rows: dict[str, list] = {k: [] for k in ("pos", "doc", "exact", "nchars", "src", "sig", "stats")}
    lens, extra = [], []
    for p, rec, st in zip(batch["pos"], batch["rec"], batch["stats"]):
        if st:
            extra.append(json.loads(st))
            continue
        r = json.loads(rec)
        lens.append(len(r["text"]))
        d = proc.process(r, stats)
        if d is None:
            continue
        rows["pos"].append(int(p))
        rows["exact"].append(d.pop("exact_key"))
        rows["sig"].append(np.asarray(d.pop("sig"), np.uint32).tobytes() if "sig" in d else b"")
        rows["src"].append(src_idx[d["source"]])
        rows["nchars"].append(len(d["text"]))
        d.pop("html", None)
        d.pop("pos", None)
        d["created_by"] = created_by
        rows["doc"].append(json.dumps(d, ensure_ascii=False) + "\n")
        rows["stats"].append("")
    info = {"steps": {k: v.to_dict() for k, v in stats.items()}, "hist_in": length_hist(lens).tolist(),
            "read": [e["read"] for e in extra]}
    rows["pos"].append(-1)
    rows["exact"].append(0)
    rows["sig"].append(b"")
    rows["src"].append(-1)
    rows["nchars"].append(0)
    rows["doc"].append("")
    rows["stats"].append(json.dumps(info))
    return {"pos": np.array(rows["pos"], np.int64), "doc": np.array(rows["doc"], object),
            "exact": _i64(np.array(rows["exact"], np.uint64)), "nchars": np.array(rows["nchars"], np.int64),
            "src": np.array(rows["src"], np.int32), "sig": np.array(rows["sig"], object),
            "stats": np.array(rows["stats"], object)}


def band_rows(batch: dict[str, np.ndarray], num_perm: int, bands: tuple[int, int], seed: int,
              exact_dups: np.ndarray) -> dict[str, np.ndarray]:
    """Documents (not exact duplicates) -> one row per LSH band {band, key (int64 bits), pos, sig}."""
    b, r = bands
    keep = (batch["pos"] >= 0) & ~np.isin(batch["pos"], exact_dups)
    pos = batch["pos"][keep]
    sig_bytes = batch["sig"][keep]
    if not len(pos):
        return {"band": np.zeros(0, np.int32), "key": np.zeros(0, np.int64), "pos": np.zeros(0, np.int64),
                "sig": np.zeros(0, object)}
    sigs = np.frombuffer(b"".join(sig_bytes), dtype=np.uint32).reshape(len(pos), num_perm)
    mult = band_multipliers(r, seed)
    keys = np.stack([band_keys(sigs[:, k * r:(k + 1) * r], mult) for k in range(b)], axis=1)  # (n, b)
    n = len(pos)
    return {"band": np.tile(np.arange(b, dtype=np.int32), n), "key": _i64(keys.reshape(-1)),
            "pos": np.repeat(pos, b), "sig": np.repeat(sig_bytes, b)}


def bucket_edges(group: dict[str, np.ndarray], num_perm: int, threshold: float) -> dict[str, np.ndarray]:
    """One LSH bucket -> its confirmed pairs {i, j} as input positions (i earlier than j)."""
    pos = group["pos"]
    if len(pos) < 2:
        return {"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64)}
    sigs = np.frombuffer(b"".join(group["sig"]), dtype=np.uint32).reshape(len(pos), num_perm)
    pairs = bucket_pairs(pos, sigs, threshold, MAX_COMPARE)
    return {"i": np.array([pos[a] for a, _ in pairs], np.int64), "j": np.array([pos[b] for _, b in pairs], np.int64)}


def decisions(pos: np.ndarray, exact_keepers: np.ndarray, exact_on: bool, edges: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows' dedup decisions from the partitions' results: ``pos`` (N,) the staged rows' input positions,
    ``exact_keepers`` the first position of each exact key, ``edges`` (E, 2) confirmed near pairs (positions).
    Priority is input order (position), as in the local executor."""
    n = len(pos)
    order = np.argsort(pos, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    is_exact = ~np.isin(pos, exact_keepers) if exact_on else np.zeros(n, dtype=bool)
    sorted_pos = pos[order]

    def row(p: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(sorted_pos, p)]

    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    is_near, roots = components(rank, list(zip(row(e[:, 0]), row(e[:, 1]))))
    return is_exact, is_near, roots


# ---- the driver ---------------------------------------------------------------------------------------------

def _init_ray(address: str | None, num_cpus: int | None):
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'lmstack[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or None, include_dashboard=False, log_to_driver=False)
    return ray


def run_ray(cfg: DataPipelineConfig, out_dir: str | os.PathLike, address: str | None = None,
            num_cpus: int | None = None) -> dict[str, Any]:
    """Run the pipeline on Ray Data; returns the report (also in ``out_dir/report.json``), like the local run."""
    import shutil

    from lmstack.config import save_config
    from lmstack.data.pipeline import STAGING, _dedup_fingerprint, _resolve, _shard_dir, _source_names, merge_shards
    from lmstack.utils.io import atomic_dir, atomic_write, atomic_write_json

    out_dir = Path(out_dir)
    files = _resolve(cfg)  # missing inputs fail here, before Ray starts
    blockwords = load_blocklist(cfg.blocklist) if cfg.blocklist.enabled else []
    sources = _source_names(cfg)
    ray = _init_ray(address, num_cpus or cfg.workers or None)
    import ray.data as rd

    t0 = time.time()
    ctx = rd.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output rows in input order, as the local executor writes them
    ctx.enable_progress_bars = False
    cfg_json = cfg.model_dump_json()
    file_rows = [{"file": json.dumps([f[0], f[1], str(f[2]), f[3], f[4].model_dump(mode="json")])} for f in files]

    def read(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        from lmstack.data.config import InputConfig

        for f in batch["file"]:
            fidx, name, path, rel, inp = json.loads(f)
            yield from read_file_batches(cfg_json, (fidx, name, Path(path), rel, InputConfig.model_validate(inp)),
                                         cfg.batch_size)

    docs = (rd.from_items(file_rows, override_num_blocks=max(1, len(file_rows)))
            .map_batches(read, batch_size=1, batch_format="numpy")
            .map_batches(process_rows, batch_size=cfg.batch_size, batch_format="numpy",
                         fn_kwargs={"cfg_json": cfg_json, "blockwords": blockwords, "sources": sources})
            .materialize())
    num_perm = cfg.dedup.num_perm

    # staging (the driver streams the rows in input order) -> the same layout run_shard writes
    if (out_dir / STAGING).exists():
        shutil.rmtree(out_dir / STAGING)
    steps = {k: StepStats(k) for k in STEP_ORDER[1:6]}
    read_stats = ReadStats(strict=cfg.strict)
    hist_in = np.zeros(len(length_hist([])), dtype=np.int64)
    n_docs, last = 0, -1
    with atomic_dir(_shard_dir(out_dir, 0, 1)) as tmp:
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as fdocs, open(tmp / "pos.bin", "wb") as fpos, \
                open(tmp / "exact.bin", "wb") as fexact, open(tmp / "src.bin", "wb") as fsrc, \
                open(tmp / "nchars.bin", "wb") as fnch, open(tmp / "sig.bin", "wb") as fsig:
            for b in docs.iter_batches(batch_size=4096, batch_format="numpy"):
                is_doc = b["pos"] >= 0
                for info in b["stats"][~is_doc]:
                    info = json.loads(info)
                    for k, d in info["steps"].items():
                        steps[k].merge(StepStats.from_dict(d), cfg.examples)
                    hist_in += np.asarray(info["hist_in"], dtype=np.int64)
                    for rs in info["read"]:
                        read_stats.merge(ReadStats(rs["files"], rs["records"], rs["bytes"],
                                                   Counter(rs["problems"]), rs["examples"]))
                pos = b["pos"][is_doc]
                if not len(pos):
                    continue
                if pos[0] <= last or np.any(np.diff(pos) <= 0):
                    raise DataError("ray executor: rows arrived out of input order (preserve_order is off?)")
                last = int(pos[-1])
                pos.tofile(fpos)
                b["exact"][is_doc].view(np.uint64).tofile(fexact)
                b["src"][is_doc].astype(np.int32).tofile(fsrc)
                b["nchars"][is_doc].astype(np.int64).tofile(fnch)
                if cfg.dedup.near:
                    fsig.write(b"".join(b["sig"][is_doc]))
                fdocs.writelines(b["doc"][is_doc])
                n_docs += len(pos)
        summary = {"shard": [0, 1], "documents": n_docs, "num_perm": num_perm if cfg.dedup.near else 0,
                   "fingerprint": _dedup_fingerprint(cfg), "sources": sources, "read": read_stats.to_dict(),
                   "steps": {k: v.to_dict() for k, v in steps.items()}, "hist_in": hist_in.tolist(),
                   "elapsed_s": time.time() - t0, "executor": "ray"}
        with atomic_write(tmp / "summary.json") as f:
            json.dump(summary, f, ensure_ascii=False)
        save_config(cfg, tmp / "config.yaml")

    # dedup as Ray operations over all partitions
    from ray.data.expressions import col

    doc_rows = docs.filter(expr=col("pos") >= 0)
    keepers = np.zeros(0, np.int64)
    if cfg.dedup.exact and n_docs:
        keepers = np.array([r["min(pos)"] for r in doc_rows.groupby("exact").min("pos").iter_rows()], np.int64)
    edges = np.zeros((0, 2), np.int64)
    if cfg.dedup.near and n_docs:
        exact_dups = np.setdiff1d(np.fromfile(_shard_dir(out_dir, 0, 1) / "pos.bin", dtype=np.int64), keepers) \
            if cfg.dedup.exact else np.zeros(0, np.int64)
        bands = optimal_bands(cfg.dedup.threshold, num_perm)
        buckets = doc_rows.map_batches(band_rows, batch_format="numpy",
                                       fn_kwargs={"num_perm": num_perm, "bands": bands, "seed": cfg.dedup.seed,
                                                  "exact_dups": exact_dups})
        found = buckets.groupby(["band", "key"]).map_groups(
            bucket_edges, batch_format="numpy", fn_kwargs={"num_perm": num_perm, "threshold": cfg.dedup.threshold})
        got = [(int(r["i"]), int(r["j"])) for r in found.iter_rows()]
        edges = np.array(sorted(set(got)), np.int64).reshape(-1, 2)
    ray_s = time.time() - t0

    def decide(pos: np.ndarray):
        return decisions(pos, keepers, cfg.dedup.exact, edges)

    report = merge_shards(cfg, out_dir, keep_staging=False, decide=decide)
    report["executor"] = {"name": "ray", "address": address or "local", "ray_s": round(ray_s, 3),
                          "cpus": int(ray.cluster_resources().get("CPU", 0))}
    atomic_write_json(out_dir / "report.json", report)
    return report
