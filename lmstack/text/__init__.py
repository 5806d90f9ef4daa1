"""Pure-text helpers shared by ``lmstack.data`` and ``lmstack.guard``: normalization, language id,
quality signals (Gopher / C4 / FineWeb) and PII detection. No torch, no I/O."""
