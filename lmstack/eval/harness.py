"""lm-evaluation-harness model type ``lmstack``: run any lm-eval task on an lmstack model directory.

lm-eval 0.4.x finds model types only in its own registry (no entry-point plugin group), so the ``lm_eval``
command cannot see ``lmstack`` by itself. Two ways work:

- command line: ``python -m lmstack.eval.harness --model lmstack --model_args pretrained=DIR[,adapter=A]
  --tasks TASK [--include_path DIR] ...`` registers the model type and then runs lm-eval's own CLI with the
  same arguments (everything ``lm_eval`` accepts);
- Python: ``import lmstack.eval.harness`` registers it; then ``lm_eval.simple_evaluate(model="lmstack",
  model_args="pretrained=DIR", tasks=[...])``.

The model scores requests with :class:`lmstack.eval.lm.EvalLM`, the same code ``lmstack eval`` uses, so the
same task gives the same numbers under both harnesses. Rolling log-likelihood uses lm-eval's own
``get_rolling_token_windows`` so perplexity tasks match its definition.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from tqdm import tqdm


class LmstackLM(LM):
    # generation runs on the serving engine, which this floor may not import: ``lmstack-lm-eval``
    # (lmstack.cli.lm_eval) sets it to lmstack.serve.evaluation.generate before lm-eval builds the model
    ENGINE = None

    def __init__(self, pretrained: str, adapter: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str | None = None, max_length: int | None = None,
                 batch_tokens: int = 8192, **_ignored):
        super().__init__()
        from lmstack.eval.lm import EvalLM

        import torch

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI defaults to cuda:0; fall back like its hf backend does
        kw = {"batch_tokens": int(batch_tokens)}
        if max_length:
            kw["max_length"] = int(max_length)
        if batch_size not in (None, "auto") and str(batch_size).isdigit():
            kw["max_batch"] = int(batch_size)
        self.lm = EvalLM.load(pretrained, adapter=adapter, device=device, dtype=dtype, engine=type(self).ENGINE, **kw)
        self.pretrained = pretrained

    @property
    def tokenizer_name(self) -> str:
        return f"lmstack-{self.lm.tok.sha256[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.tok.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.lm.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [r.args for r in requests]
        bar = tqdm(total=len(pairs), disable=disable_tqdm, desc="lmstack loglikelihood")
        out = self.lm.loglikelihood(pairs)
        bar.update(len(pairs))
        bar.close()
        for (c, x), res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", (c, x), res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        prefix = self.lm.prefix_ids()[0]
        reqs, owner = [], []
        for i, r in enumerate(requests):
            (text,) = r.args
            for w in get_rolling_token_windows(self.lm.tok.encode(text), prefix, self.lm.max_length,
                                               context_len=1):
                reqs.append(make_disjoint_window(w))
                owner.append(i)
        scores = self.lm.loglikelihood_tokens(reqs)
        totals = [0.0] * len(requests)
        for i, (s, _) in zip(owner, scores):
            totals[i] += s
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in tqdm(requests, disable=disable_tqdm, desc="lmstack generate"):
            ctx, kw = r.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            text = self.lm.generate([ctx], max_tokens=int(kw.get("max_gen_toks", 256)), stop=until,
                                    temperature=temp, top_p=float(kw.get("top_p", 1.0)))[0][0]
            self.cache_hook.add_partial("generate_until", (ctx, r.args[1]), text)
            out.append(text)
        return out


def register() -> None:
    """Make ``--model lmstack`` resolvable in lm-eval (idempotent)."""
    import importlib

    importlib.import_module("lm_eval.models")  # registers lm-eval's own model types first

    if "lmstack" not in model_registry:
        register_model("lmstack")(LmstackLM)


register()


LOCAL_ONLY_FLAG = "--local_tasks_only"


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with the ``lmstack`` model type registered.

    ``--local_tasks_only`` (ours, removed before lm-eval parses the rest) makes lm-eval index only the
    ``--include_path`` tasks instead of its ~10k built-in YAML files (about 40 s saved per run)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if LOCAL_ONLY_FLAG in args:
        import lm_eval.tasks as lt

        class _LocalTaskManager(lt.TaskManager):
            def __init__(self, *a, **kw):
                kw.setdefault("include_defaults", False)
                super().__init__(*a, **kw)

        args.remove(LOCAL_ONLY_FLAG)
        lt.TaskManager = _LocalTaskManager  # lm-eval's CLI imports it from here when it builds tasks
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
