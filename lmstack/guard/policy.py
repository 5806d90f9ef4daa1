"""The guard policy: which rails run on input, on retrieved context and on output, each one's action and
thresholds, plus streaming, audit and rate-limit settings. One YAML file, validated strictly (an unknown key or a
bad value fails with the file and the field), e.g.::

    version: 1
    input:
      max_chars: 8000
      pii: {action: redact}
      injection: {action: block, threshold: 0.5, message: "I can't help with that request."}
      topic: {action: block, threshold: 0.6, message: "I can only help with orders, shipping, returns ..."}
    context:
      sanitize: {action: redact}
    output:
      secrets: {action: block}
      pii: {action: redact}
      toxicity: {action: block}
      grounding: {action: warn, threshold: 0.45}
    stream: {window: 48, hold: 64}
    audit: {path: runs/support/audit.db, text: redacted, text_retention_days: 30}
    rate_limit: {requests_per_minute: 30, burst: 10}

Actions: ``block`` (the request or answer is replaced by the rail's ``message``), ``redact`` (the offending spans
or sentences are removed; only for rails that find spans: pii, secrets, toxicity, sanitize, grounding), ``warn``
(passes, the verdict carries the warning) and ``log`` (passes, only the audit log records it). A rail left out
(or ``enabled: false``) does not run. The support app's default is ``data/support_policy.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from lmstack.config import StrictModel, read_yaml, validate
from lmstack.text.pii import check_kinds

SpanAction = Literal["block", "redact", "warn", "log"]
FlagAction = Literal["block", "warn", "log"]  # rails that score the whole text: nothing to redact
DEFAULT_POLICY = Path(__file__).with_name("data") / "support_policy.yaml"
BLOCKED = "Sorry, I can't help with that request."


class Rail(StrictModel):
    enabled: bool = True
    message: Optional[str] = Field(None, max_length=2000)  # shown instead of the text when the action is block


class PIIRail(Rail):
    action: SpanAction = "redact"
    kinds: Optional[list[str]] = None  # default: every kind lmstack.text.pii finds
    # input rail, action redact: kinds redacted with numbered placeholders (<EMAIL_1>) that the servers put back
    # in the answer sent to the same client (the model never sees the value; "we will write to <EMAIL_1>" reaches
    # the customer with their address). Empty: plain placeholders, nothing given back.
    reversible: list[str] = Field(default_factory=list)

    @field_validator("kinds", "reversible")
    @classmethod
    def _known(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        return check_kinds(v)


class InjectionRail(Rail):
    action: FlagAction = "block"
    threshold: float = Field(0.5, ge=0.0, le=1.0)  # on max(pattern hit = 1, classifier P(attack))
    patterns: bool = True
    classifier: bool = True
    data: Optional[str] = None  # labelled set the classifier trains on (default: the shipped data/injection.jsonl)
    model: Optional[str] = None  # a directory written by `lmstack guard train` (default: trained at first use, cached)


class TopicRail(Rail):
    action: FlagAction = "block"
    threshold: float = Field(0.5, ge=0.0, le=1.0)  # on P(off_topic)
    # keyword lists, checked before the classifier (case-insensitive; whole words for Latin text, substrings for
    # Chinese): a deny term always fires the rail (score 1); an allow term keeps the request in scope (score 0)
    deny: list[str] = Field(default_factory=list, max_length=10_000)
    allow: list[str] = Field(default_factory=list, max_length=10_000)
    classifier: bool = True
    data: Optional[str] = None  # in_scope / off_topic labelled set (default: the support app's data/topic.jsonl)
    model: Optional[str] = None
    embedder: Optional[str] = "auto"  # "auto": MiniLM when installed (better on English), else n-grams only


class PerplexityRail(Rail):
    """NeMo Guardrails' jailbreak heuristics, computed with the served model (needs a scorer)."""
    enabled: bool = False
    action: FlagAction = "warn"
    length_per_perplexity: float = Field(89.79, gt=0)  # flag when len(text) / ppl(text) >= this
    prefix_suffix_perplexity: float = Field(1845.65, gt=0)  # flag when ppl(first 20 words) or ppl(last 20) >= this


class SecretsRail(Rail):
    action: SpanAction = "block"


class ToxicityRail(Rail):
    action: SpanAction = "block"
    threshold: float = Field(0.5, ge=0.0, le=1.0)  # classifier P(toxic); a word-list hit always counts
    classifier: bool = True
    words: list[str] = Field(default_factory=list, max_length=10_000)  # extra terms beside the shipped lists
    data: Optional[str] = None
    model: Optional[str] = None


class GroundingRail(Rail):
    action: SpanAction = "warn"  # redact: drop the unsupported sentences; block: replace the whole answer
    threshold: float = Field(0.45, ge=0.0, le=1.0)  # a sentence whose support score is below this is unsupported
    min_words: int = Field(3, ge=1)  # shorter sentences ("Thanks!") make no claim and are not checked
    check_numbers: bool = True  # a number the passages do not contain makes a sentence unsupported
    embedder: Optional[str] = "auto"


class SanitizeRail(Rail):
    action: Literal["redact", "warn", "log"] = "redact"  # redact: cut instruction-like sentences from passages
    spotlight: bool = True  # wrap passages in nonce delimiters (rules.spotlight)


class InputRails(StrictModel):
    max_chars: int = Field(8000, ge=1, le=10_000_000)  # longer input is blocked unread
    pii: Optional[PIIRail] = None
    injection: Optional[InjectionRail] = None
    topic: Optional[TopicRail] = None
    perplexity: Optional[PerplexityRail] = None


class ContextRails(StrictModel):
    sanitize: Optional[SanitizeRail] = None


class OutputRails(StrictModel):
    max_chars: int = Field(32000, ge=1, le=10_000_000)
    secrets: Optional[SecretsRail] = None
    pii: Optional[PIIRail] = None
    toxicity: Optional[ToxicityRail] = None
    grounding: Optional[GroundingRail] = None


class StreamSettings(StrictModel):
    window: int = Field(48, ge=1, le=100_000)  # check after this many new characters
    hold: int = Field(64, ge=0, le=100_000)  # characters held back until the next check (longer than a PII span)


class AuditSettings(StrictModel):
    # .db / .sqlite / .sqlite3: SQLite (WAL), one row per request; other suffixes: JSON Lines; None: no audit log
    path: Optional[str] = None
    text: Literal["none", "redacted", "raw"] = "redacted"  # what text a record keeps beside its SHA-256 hashes
    max_text_chars: int = Field(200, ge=0, le=100_000)  # text kept per record (first characters)
    text_retention_days: Optional[float] = Field(30.0, gt=0)  # SQLite: text columns cleared after this; None: kept
    busy_timeout_ms: int = Field(1000, ge=0, le=60_000)  # SQLite: wait this long for a lock, then drop the record


class RateLimit(StrictModel):
    requests_per_minute: float = Field(..., gt=0)
    burst: int = Field(10, ge=1)


class GuardPolicy(StrictModel):
    version: Literal[1] = 1
    name: str = "custom"
    input: InputRails = Field(default_factory=InputRails)
    context: ContextRails = Field(default_factory=ContextRails)
    output: OutputRails = Field(default_factory=OutputRails)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    rate_limit: Optional[RateLimit] = None
    blocked_message: str = Field(BLOCKED, max_length=2000)
    # how the servers answer a blocked request: "refuse" -- a normal chat answer carrying the rail's polite message
    # (finish_reason "content_filter"); "error" -- an OpenAI-shaped error (400, code "content_filter"; 429 with
    # code "rate_limit_exceeded" for the rate limit)
    on_block: Literal["refuse", "error"] = "refuse"


def policy_path(spec: str | Path | None) -> Path:
    """A policy file: ``None`` or ``"default"`` (the name the CLIs and recipes use) -> the shipped support policy."""
    return DEFAULT_POLICY if spec is None or str(spec) == "default" else Path(spec)


def load_policy(path: str | Path | None = None) -> GuardPolicy:
    """The policy in ``path`` (None or ``"default"``: the shipped support policy). Errors are one line naming the
    file and the field (:class:`lmstack.errors.ConfigError`, exit status 2 on the command line)."""
    p = policy_path(path)
    if p.is_file() and p.stat().st_size > 1 << 20:
        from lmstack.errors import ConfigError

        raise ConfigError(f"{p}: a guard policy over 1 MiB is not a policy")
    data = read_yaml(p, what="guard policy")
    return validate(GuardPolicy, data, str(p))  # a relative audit.path is relative to the working directory
