"""The Ray executor's partition functions without Ray (always on, fast): documents split into partitions at random,
the per-partition functions (band rows, bucket comparisons, exact keepers by group minimum) and the driver's union
give the same exact and near dedup decisions as the local executor's global pass (lmstack.data.minhash). The run
on a real local Ray, output compared byte for byte with the local executor, is tests/ray_pipeline.py
(`make test-ray`)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from lmstack.data.minhash import exact_duplicates, near_duplicates, optimal_bands
from lmstack.data.ray_exec import band_rows, bucket_edges, decisions


def _corpus(rng, n=300, num_perm=64):
    """Signatures with planted near-duplicate groups (share of equal rows ~0.95 / ~0.6) and exact keys with repeats."""
    sigs = rng.integers(0, 2**32, size=(n, num_perm), dtype=np.uint64).astype(np.uint32)
    for _ in range(40):
        a, b = rng.choice(n, 2, replace=False)
        same = rng.random(num_perm) < rng.choice([0.95, 0.6])
        sigs[b, same] = sigs[a, same]
    with np.errstate(over="ignore"):
        keys = rng.integers(0, 2 * n, size=n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # some repeat
    return sigs, keys


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partitioned_dedup_equals_the_global_pass(seed):
    rng = np.random.default_rng(seed)
    num_perm, threshold = 64, 0.8
    sigs, keys = _corpus(rng, num_perm=num_perm)
    n = len(sigs)
    # documents arrive with input positions (file << 32 | record), staged in a shuffled row order
    pos = rng.permutation(np.unique(rng.integers(0, 4 << 32, size=2 * n, dtype=np.int64)))[:n]
    perm = rng.permutation(n)
    pos_r, sigs_r, keys_r = pos[perm], sigs[perm], keys[perm]
    # reference: the local executor's global pass in input order
    rank = np.argsort(np.argsort(pos_r, kind="stable"), kind="stable")
    order = np.argsort(pos_r, kind="stable")
    ref_exact = np.zeros(n, bool)
    ref_exact[order] = exact_duplicates(keys_r[order])
    ref_near, ref_pairs = near_duplicates(sigs_r, threshold, active=~ref_exact, seed=7, priority=rank)
    assert ref_exact.sum() > 5 and ref_near.sum() > 5  # the planted duplicates are there
    # partitions: random cut points; exact keepers = min position per key, over all partitions
    cuts = np.sort(rng.choice(np.arange(1, n), 5, replace=False))
    parts = np.split(np.arange(n), cuts)
    first: dict[int, int] = {}
    for p in parts:
        for k, q in zip(keys_r[p], pos_r[p]):
            first[int(k)] = min(first.get(int(k), q), q)
    keepers = np.array(sorted(first.values()), np.int64)
    exact_dups = np.setdiff1d(pos_r, keepers)
    # near: band rows per partition, grouped by (band, key) across partitions, edges per bucket
    bands = optimal_bands(threshold, num_perm)
    groups = defaultdict(lambda: {"pos": [], "sig": []})
    for p in parts:
        batch = {"pos": pos_r[p], "sig": np.array([s.tobytes() for s in sigs_r[p]], object)}
        rows = band_rows(batch, num_perm, bands, 7, exact_dups)
        for b, k, q, s in zip(rows["band"], rows["key"], rows["pos"], rows["sig"]):
            groups[(int(b), int(k))]["pos"].append(q)
            groups[(int(b), int(k))]["sig"].append(s)
    edges = []
    for g in list(groups.values())[::-1]:  # bucket order does not matter
        e = bucket_edges({"pos": np.array(g["pos"], np.int64), "sig": np.array(g["sig"], object)}, num_perm, threshold)
        edges += list(zip(e["i"], e["j"]))
    is_exact, is_near, roots = decisions(pos_r, keepers, True, np.array(edges, np.int64))
    np.testing.assert_array_equal(is_exact, ref_exact)
    np.testing.assert_array_equal(is_near, ref_near)
    assert [(j, int(roots[j])) for j in np.flatnonzero(is_near)] == [(j, r) for j, r, _ in ref_pairs]


def test_bucket_edges_compare_in_input_order_and_skip_singletons():
    sig = np.arange(8, dtype=np.uint32)
    other = sig.copy()
    other[0] = 99  # 7/8 equal rows
    g = {"pos": np.array([30, 10], np.int64), "sig": np.array([other.tobytes(), sig.tobytes()], object)}
    e = bucket_edges(g, 8, 0.8)
    assert list(e["i"]) == [10] and list(e["j"]) == [30]  # the earlier position is the one kept
    assert len(bucket_edges(g, 8, 0.9)["i"]) == 0
    assert len(bucket_edges({"pos": g["pos"][:1], "sig": g["sig"][:1]}, 8, 0.5)["i"]) == 0


def test_executor_flags_are_checked_before_work(tmp_path):
    from lmstack.data.pipeline import run_pipeline
    from lmstack.errors import ConfigError

    cfg = {"inputs": [{"path": str(tmp_path / "missing.jsonl")}]}
    with pytest.raises(ConfigError, match="executor"):
        run_pipeline(cfg, tmp_path / "o", executor="spark")
    with pytest.raises(ConfigError, match="--shard"):
        run_pipeline(cfg, tmp_path / "o", executor="ray", shard="0/2")
    with pytest.raises(ConfigError, match="--executor ray"):
        run_pipeline(cfg, tmp_path / "o", ray_address="auto")
