"""Pure-text helpers shared by ``lmstack.data`` and ``lmstack.guard``: normalization, language id,
quality signals (Gopher / C4 / FineWeb) and PII detection. No torch, no I/O."""

from typing import Any


def content_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: the string itself, or the joined ``{"type": "text"}`` parts of
    a list (images and other parts dropped); ``""`` for anything else (``None``, a number, an object)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
