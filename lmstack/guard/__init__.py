"""Guardrails and governance: input / context / output rails under a YAML policy, a hash-chained audit log
(SQLite, one row per request: lmstack.guard.audit, ``lmstack audit``), per-key rate limits, /metrics counters
(lmstack.guard.asgi), and a green-list generation watermark (lmstack.guard.watermark). Text in, verdict out
(docs/guard.md).

    from lmstack.guard import Guard, GuardContext
    guard = Guard.from_policy("policy.yaml")      # Guard(): the shipped support policy
    v = guard.check_input(user_text, GuardContext(key=api_key))
    if v.blocked: reply(v.message)
"""

from lmstack.guard.guard import ContextResult, Guard, GuardContext, RailResult, StreamChecker, Verdict
from lmstack.guard.policy import DEFAULT_POLICY, GuardPolicy, load_policy

__all__ = ["ContextResult", "Guard", "GuardContext", "RailResult", "StreamChecker", "Verdict", "DEFAULT_POLICY",
           "GuardPolicy", "load_policy"]
