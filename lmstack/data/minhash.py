"""MinHash signatures and banded LSH near-duplicate detection over signature arrays.

Signatures use datasketch's ``affine32`` scheme (its default since 2.0): each 32-bit shingle hash is
pre-mixed with MurmurHash3's fmix32, then permuted by ``a*x + b mod 2^32`` with odd ``a`` (the same draws),
so given the same shingle hashes they equal ``datasketch.MinHash(num_perm, seed, scheme="affine32")``. Shingles: word n-grams for spaced languages,
character n-grams for CJK text, on the dedup-normalized text (NFKC, lower case, punctuation removed). The
pipeline hashes shingles with a vectorized rolling polynomial over per-word CRC-32s (or code points for CJK),
finalized with MurmurHash3's fmix64 -- one Python call per distinct word instead of one SHA-1 per shingle.

Near-duplicate detection is done in one pass over the signatures of *all* shards (so it works across
machines): for each of ``b`` bands of ``r`` rows, documents with equal band keys are candidates; a candidate
pair is confirmed when the estimated Jaccard similarity (share of equal signature values) reaches the
threshold; confirmed pairs are unioned and each cluster keeps its earliest document.
``(b, r)`` minimises false-positive + false-negative probability mass for the threshold, as in datasketch.

References: Broder 1997 (MinHash); Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3 (LSH
banding); Lee et al. 2022 "Deduplicating Training Data Makes Language Models Better".
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
import unicodedata
import zlib
from typing import Sequence

import numpy as np

from lmstack.text.normalize import dedup_key_text
from lmstack.text.quality import is_cjk

MAX_HASH = np.uint32(0xFFFFFFFF)
_ALNUM = re.compile(r"[^\W_]+")


def sha1_hash32(data: bytes) -> int:
    return struct.unpack("<I", hashlib.sha1(data).digest()[:4])[0]


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm,) uint32, ``a`` odd -- the same draws as datasketch's affine32 scheme."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finalizer, elementwise on uint32."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))


def shingles(text: str, ngram: int = 5, cjk_ngram: int = 5) -> list[bytes]:
    """Word n-grams (spaced text) or character n-grams (CJK text) of the dedup-normalized text, as bytes."""
    norm = dedup_key_text(text)
    if is_cjk(text):
        chars = norm.replace(" ", "")
        n = cjk_ngram
        if len(chars) <= n:
            return [chars.encode()] if chars else []
        return list({chars[i:i + n].encode() for i in range(len(chars) - n + 1)})
    words = norm.split()
    n = ngram
    if len(words) <= n:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)})


_POLY = np.uint64(0x100000001B3)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 64-bit finalizer (avalanche), elementwise on uint64."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def shingle_hashes(text: str, ngram: int = 5, cjk_ngram: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes (uint32) of the same shingles as :func:`shingles`: (n_distinct,)."""
    tokens = _ALNUM.findall(unicodedata.normalize("NFKC", text).lower())  # == dedup_key_text(text).split()
    if is_cjk(text):
        x = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (L,) chars
        n = cjk_ngram
    else:
        table = {w: zlib.crc32(w.encode()) for w in set(tokens)}
        x = np.fromiter(map(table.__getitem__, tokens), dtype=np.uint64, count=len(tokens))   # (L,) words
        n = ngram
    if len(x) == 0:
        return np.zeros(0, dtype=np.uint32)
    n = min(n, len(x))
    x = _fmix64(x + np.uint64(1))
    m = len(x) - n + 1
    h = x[:m].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h = h * _POLY + x[k:m + k]
    return np.unique((_fmix64(h) >> np.uint64(32)).astype(np.uint32))


def signature_from_hashes(hv: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """MinHash signature (num_perm,) uint32 from 32-bit shingle hashes ``hv`` (n,); all 0xFFFFFFFF if empty."""
    out = np.full(a.shape[0], MAX_HASH, dtype=np.uint32)
    hv = _fmix32(np.asarray(hv).astype(np.uint32))
    with np.errstate(over="ignore"):
        for s in range(0, len(hv), chunk):
            phv = hv[s:s + chunk, None] * a[None, :] + b[None, :]   # (chunk, num_perm) uint32, wraps mod 2^32
            np.minimum(out, phv.min(axis=0), out=out)
    return out


def text_signature(text: str, a: np.ndarray, b: np.ndarray, ngram: int = 5, cjk_ngram: int = 5) -> np.ndarray:
    """The pipeline's signature of one document: (num_perm,) uint32."""
    return signature_from_hashes(shingle_hashes(text, ngram, cjk_ngram), a, b)


def signature(shingle_bytes: list[bytes], a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """MinHash signature (num_perm,) uint32 of a set of byte shingles hashed with SHA-1 (datasketch's default
    hash); all-ones (max hash) for an empty set. The pipeline uses the faster :func:`text_signature`."""
    hv = np.fromiter((sha1_hash32(x) for x in shingle_bytes), dtype=np.uint32, count=len(shingle_bytes))
    return signature_from_hashes(hv, a, b, chunk)


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                  ) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising weighted FP + FN area (datasketch's rule)."""
    xs = np.linspace(0.0, 1.0, 2001)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - xs ** r) ** b  # P(candidate | Jaccard = x)
            fp = np.trapezoid(np.where(xs <= threshold, p, 0.0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class _UnionFind:
    """Union-find whose roots are the highest-priority (lowest ``prio``) member of each set."""

    def __init__(self, prio: np.ndarray) -> None:
        self.parent = np.arange(len(prio), dtype=np.int64)
        self.prio = prio

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = int(p[root])
        while p[x] != root:
            p[x], x = root, int(p[x])
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            if self.prio[rx] < self.prio[ry]:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry


def band_multipliers(r: int, seed: int) -> np.ndarray:
    """(r,) odd uint64 multipliers that fold one band of ``r`` signature rows into one bucket key."""
    return np.random.RandomState(seed).randint(1, 2**62, size=r, dtype=np.int64).astype(np.uint64) | np.uint64(1)


def band_keys(block: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """Bucket keys (n,) uint64 of one band ``block`` (n, r) of signatures (wrapping multiply-add)."""
    with np.errstate(over="ignore"):
        return (np.asarray(block, dtype=np.uint64) * mult[None, :]).sum(axis=1, dtype=np.uint64)


def bucket_pairs(prio: np.ndarray, sigs: np.ndarray, threshold: float, max_compare: int = 32
                 ) -> list[tuple[int, int]]:
    """Confirmed pairs inside one LSH bucket: members ordered by ``prio`` (n,), each compared with the
    ``max_compare`` members before it; (earlier index, later index) where the estimated Jaccard (share of equal
    signature rows, ``sigs`` (n, num_perm)) reaches ``threshold``. The same rule as :func:`near_duplicates`."""
    order = np.argsort(prio, kind="stable")
    out = []
    for k in range(1, len(order)):
        j = int(order[k])
        for i in order[max(0, k - max_compare):k]:
            if float(np.mean(sigs[int(i)] == sigs[j])) >= threshold:
                out.append((int(i), j))
    return out


def components(prio: np.ndarray, edges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Groups joined by ``edges``; the kept row of each group is its highest-priority (lowest ``prio``) member.
    Returns (is_dup (N,) bool, roots (N,) int64: each row's kept row). The edge order does not matter."""
    uf = _UnionFind(np.asarray(prio))
    for i, j in edges:
        uf.union(int(i), int(j))
    n = len(prio)
    roots = np.arange(n, dtype=np.int64)
    for x in np.flatnonzero(uf.parent != roots):  # only rows that were unioned under another root
        roots[x] = uf.find(int(x))
    return roots != np.arange(n), roots


def near_duplicates(sigs: np.ndarray, threshold: float, active: np.ndarray | None = None,
                    bands: tuple[int, int] | None = None, max_compare: int = 32, seed: int = 0,
                    priority: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Near-duplicate flags for ``sigs`` (N, num_perm) uint32 (an array or a read-only memmap).

    ``priority`` (N,): lower wins (default: row order, earlier row wins). ``active`` (N,) bool: rows to
    consider (e.g. not exact duplicates). Returns (is_dup (N,) bool, a sample of confirmed pairs
    (dup_row, kept_row, estimated_jaccard) for reports). Memory: O(N) per band plus the candidate rows."""
    n, num_perm = sigs.shape
    active = np.ones(n, dtype=bool) if active is None else active
    prio = np.arange(n, dtype=np.int64) if priority is None else np.asarray(priority)
    b, r = bands or optimal_bands(threshold, num_perm)
    uf = _UnionFind(prio)
    rows_active = np.flatnonzero(active)
    prio_active = prio[rows_active]
    mult = band_multipliers(r, seed)
    checked: set[tuple[int, int]] = set()
    for band in range(b):
        keys = band_keys(np.asarray(sigs[rows_active, band * r:(band + 1) * r]), mult)  # (n_active,)
        order = np.lexsort((prio_active, keys))   # by key, then priority
        sk = keys[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        ends = np.r_[starts[1:], len(sk)]
        multi = ends - starts > 1
        for s, e in zip(starts[multi], ends[multi]):
            members = rows_active[order[s:e]]     # highest priority first
            for k in range(1, len(members)):
                j = int(members[k])
                for i in members[max(0, k - max_compare):k]:
                    i = int(i)
                    if (i, j) in checked:
                        continue
                    checked.add((i, j))
                    if float(np.mean(np.asarray(sigs[i]) == np.asarray(sigs[j]))) >= threshold:
                        uf.union(i, j)
    is_dup = np.zeros(n, dtype=bool)
    pairs: list[tuple[int, int, float]] = []
    for j in np.flatnonzero(uf.parent != np.arange(n)):  # only rows that were unioned under another root
        root = uf.find(int(j))
        if root != j:
            is_dup[j] = True
            if len(pairs) < 1000:
                pairs.append((int(j), root, float(np.mean(np.asarray(sigs[j]) == np.asarray(sigs[root])))))
    return is_dup, pairs


def exact_key(text: str) -> int:
    """64-bit key of the dedup-normalized text (NFKC, lower case, no punctuation, single spaces)."""
    return int.from_bytes(hashlib.blake2b(dedup_key_text(text).encode(), digest_size=8).digest(), "little")


def exact_duplicates(keys: np.ndarray) -> np.ndarray:
    """(N,) bool: True where the key already occurred at an earlier row."""
    _, first = np.unique(keys, return_index=True)
    is_dup = np.ones(len(keys), dtype=bool)
    is_dup[first] = False
    return is_dup
