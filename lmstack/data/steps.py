"""Per-document pipeline steps (run in worker processes): normalize -> language -> quality -> blocklist -> PII,
then the dedup keys (exact key, MinHash signature) of each surviving document.

Each step records what it did in a :class:`StepStats` (documents and characters in/out, removal reasons,
changes, a few examples per reason), so the report can say exactly what was removed and why.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.data.config import BlocklistConfig, DataPipelineConfig
from lmstack.data.minhash import exact_key, permutations, text_signature
from lmstack.errors import ConfigError
from lmstack.text.lang import detect_language
from lmstack.text.normalize import normalize_text
from lmstack.text.pii import redact
from lmstack.text.quality import quality_check

STEP_ORDER = ("read", "normalize", "language", "quality", "blocklist", "pii", "exact_dedup", "near_dedup", "mix")
SNIPPET = 160


def snippet(text: str, n: int = SNIPPET) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[:n] + "…"


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: Counter = field(default_factory=Counter)   # reason -> documents
    changed: Counter = field(default_factory=Counter)   # kind of change -> documents (or items, for PII)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def example(self, key: str, text: str, limit: int) -> None:
        lst = self.examples.setdefault(key, [])
        if len(lst) < limit:
            lst.append(text)

    def merge(self, o: "StepStats", limit: int) -> None:
        self.docs_in += o.docs_in
        self.docs_out += o.docs_out
        self.chars_in += o.chars_in
        self.chars_out += o.chars_out
        self.removed.update(o.removed)
        self.changed.update(o.changed)
        for k, v in o.examples.items():
            for t in v:
                self.example(k, t, limit)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "chars_in": self.chars_in,
                "chars_out": self.chars_out, "removed": dict(self.removed.most_common()),
                "changed": dict(self.changed.most_common()), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepStats":
        return cls(d["name"], d["docs_in"], d["docs_out"], d["chars_in"], d["chars_out"], Counter(d["removed"]),
                   Counter(d["changed"]), {k: list(v) for k, v in d["examples"].items()})


BUILTIN_BLOCKLISTS = Path(__file__).parent / "blocklists"


def load_blocklist(cfg: BlocklistConfig) -> list[str]:
    """Words from ``words``, the built-in lists named in ``builtin`` and ``files`` (one per line, '#' comments)."""
    words = list(cfg.words)
    for f in [*(BUILTIN_BLOCKLISTS / f"{name}.txt" for name in cfg.builtin), *cfg.files]:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"blocklist.files: {f} does not exist")
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                words.append(line)
    return words


def compile_blocklist(words: list[str]) -> re.Pattern | None:
    """English (ASCII) words match whole words, case-insensitively; other words (Chinese) match as substrings."""
    if not words:
        return None
    ascii_w = sorted({w.lower() for w in words if w.isascii()}, key=len, reverse=True)
    other = sorted({w for w in words if not w.isascii()}, key=len, reverse=True)
    parts = []
    if ascii_w:
        parts.append(r"(?<![A-Za-z0-9_])(?:" + "|".join(map(re.escape, ascii_w)) + r")(?![A-Za-z0-9_])")
    if other:
        parts.append("(?:" + "|".join(map(re.escape, other)) + ")")
    return re.compile("|".join(parts), re.IGNORECASE)


class DocProcessor:
    """The per-document steps for one config; built once per worker process."""

    def __init__(self, cfg: DataPipelineConfig, blockwords: list[str], with_dedup_keys: bool = True) -> None:
        self.cfg = cfg
        self.block = compile_blocklist(blockwords) if cfg.blocklist.enabled else None
        self.with_sig = with_dedup_keys and cfg.dedup.near
        if self.with_sig:
            self.perm_a, self.perm_b = permutations(cfg.dedup.num_perm, cfg.dedup.seed)

    def new_stats(self) -> dict[str, StepStats]:
        return {n: StepStats(n) for n in STEP_ORDER[1:6]}

    def process(self, rec: dict[str, Any], stats: dict[str, StepStats]) -> dict[str, Any] | None:
        """Run the steps on one record dict (``text``, ``id``, ``html`` ...); None when a step removed it."""
        cfg, ex = self.cfg, self.cfg.examples
        text = rec["text"]
        # normalize
        st = stats["normalize"]
        st.docs_in += 1
        st.chars_in += len(text)
        if cfg.normalize.enabled or rec.get("html"):
            n = cfg.normalize
            html_mode = "always" if rec.get("html") else n.html
            new, changed = normalize_text(text, nfkc=n.nfkc and n.enabled, control=n.control and n.enabled,
                                          whitespace=n.whitespace or bool(rec.get("html")), html_mode=html_mode,
                                          mojibake=n.mojibake and n.enabled, keep_cjk_punct=n.keep_cjk_punct)
            for c in changed:
                st.changed[c] += 1
                st.example(c, f"{rec['id']}: {snippet(text, 80)!r} -> {snippet(new, 80)!r}", ex)
            text = new
        if not text.strip():
            return self._drop(st, "empty_after_normalize", rec, text)
        self._keep(st, text)
        # language
        st = stats["language"]
        self._in(st, text)
        lang, score = detect_language(text)
        rec["lang"], rec["lang_score"] = lang, score
        if cfg.language.enabled:
            if lang not in cfg.language.keep:
                return self._drop(st, f"lang_{lang}", rec, text)
            if score < cfg.language.min_score:
                return self._drop(st, "lang_low_score", rec, text)
        self._keep(st, text)
        # quality
        st = stats["quality"]
        self._in(st, text)
        if cfg.quality.enabled:
            reason, _ = quality_check(text, cfg.quality)
            if reason is not None:
                return self._drop(st, reason, rec, text)
        self._keep(st, text)
        # blocklist
        st = stats["blocklist"]
        self._in(st, text)
        if self.block is not None:
            hits = self.block.findall(text)
            if len(hits) > cfg.blocklist.max_hits:
                return self._drop(st, "blocklisted", rec, text, extra=f" [{', '.join(sorted(set(hits))[:5])}]")
        self._keep(st, text)
        # PII
        st = stats["pii"]
        self._in(st, text)
        if cfg.pii.enabled:
            r = redact(text, cfg.pii.kinds)
            if r.counts:
                if cfg.pii.action == "drop":
                    return self._drop(st, "pii", rec, text, extra=f" {r.counts}")
                for k, v in r.counts.items():
                    st.changed[k] += v
                    if len(st.examples.get(k, ())) < ex:
                        sp = next(x for x in r.spans if x.kind == k)
                        ctx = text[max(0, sp.start - 40):sp.end + 40].replace("\n", " ")
                        st.example(k, f"{rec['id']}: {sp.text!r} in …{ctx}…", ex)
                rec["pii"] = r.counts
                if cfg.pii.action == "redact":
                    text = r.text
        self._keep(st, text)
        rec["text"] = text
        rec["exact_key"] = exact_key(text) if cfg.dedup.exact else 0
        if self.with_sig:
            rec["sig"] = text_signature(text, self.perm_a, self.perm_b, cfg.dedup.ngram, cfg.dedup.cjk_ngram)
        return rec

    @staticmethod
    def _in(st: StepStats, text: str) -> None:
        st.docs_in += 1
        st.chars_in += len(text)

    @staticmethod
    def _keep(st: StepStats, text: str) -> None:
        st.docs_out += 1
        st.chars_out += len(text)

    def _drop(self, st: StepStats, reason: str, rec: dict, text: str, extra: str = "") -> None:
        st.removed[reason] += 1
        st.example(reason, f"{rec['id']}{extra}: {snippet(text)}", self.cfg.examples)
        return None


# ---- worker-process entry points (module level so multiprocessing can pickle them) ----------------------
_PROC: DocProcessor | None = None


def init_worker(cfg_json: str, blockwords: list[str], with_dedup_keys: bool) -> None:
    global _PROC
    _PROC = DocProcessor(DataPipelineConfig.model_validate_json(cfg_json), blockwords, with_dedup_keys)


def init_pool_worker(cfg_json: str, blockwords: list[str], with_dedup_keys: bool) -> None:
    """Pool initializer: the parent alone handles Ctrl-C / SIGTERM (it stops the pool, which terminates the
    workers); a worker interrupted mid-batch would otherwise die without a result and leave the parent waiting."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    init_worker(cfg_json, blockwords, with_dedup_keys)


def process_batch(batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Run the steps over a batch; returns (surviving records, step stats as dicts)."""
    assert _PROC is not None, "init_worker was not called"
    stats = _PROC.new_stats()
    out = [r for r in (_PROC.process(rec, stats) for rec in batch) if r is not None]
    return out, {k: v.to_dict() for k, v in stats.items()}
