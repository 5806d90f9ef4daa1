"""``lmstack-lm-eval``: lm-evaluation-harness's own CLI with the ``lmstack`` model type registered, its
generation on lmstack's serving engine (the one decoding loop). See :mod:`lmstack.eval.harness`."""

from __future__ import annotations

from lmstack.eval import harness
from lmstack.eval.harness import LmstackLM
from lmstack.serve.evaluation import generate

LmstackLM.ENGINE = generate


def main(argv: list[str] | None = None) -> None:
    harness.main(argv)


__all__ = ["LmstackLM", "main"]


if __name__ == "__main__":  # pragma: no cover
    main()
