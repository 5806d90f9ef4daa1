"""What PPO and GRPO share: the policy (LoRA or full) and its reference, the prompts, the rollout engine, the
reward (a verifiable function or a reward model), the held-out evaluation and the metrics files.

* **LoRA** (default): the reference is the same module with its adapters switched off
  (:func:`lmstack.tune.lora.lora_disabled`): one copy of the weights.
* **full**: the reference is a frozen deep copy made before the first update.

``run_dir`` gets ``config.yaml``, ``metrics.jsonl`` (one record per step: reward mean/std, KL, clip fraction,
entropy, response length, losses; ``val_reward`` at evaluations), ``loss.png``, ``rewards.png``,
``rl_eval.json`` (held-out reward before and after, with sample responses) and ``final/`` (a PEFT adapter, or
a model directory for ``method: full``; PPO adds ``value_head.safetensors``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmstack.errors import ConfigError, DataError
from lmstack.rl.rewards import load_reward_function, score_all
from lmstack.rl.rollout import Rollout, generate, make_engine
from lmstack.utils.io import atomic_write_json

def _console():
    from lmstack.tune.sft import console

    return console


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptSet:
    ids: list[list[int]]
    texts: list[str]
    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(path: str | Path, tok: Any, chat: bool, max_len: int, limit: int | None = None) -> PromptSet:
    """JSONL records with ``prompt`` (a string or chat messages) or ``prompt_ids`` (token ids, no tokenizer
    needed); every other field stays in the record for the reward. Over-long prompts are skipped and counted."""
    from lmstack.tune.data import DataReport, read_records

    report = DataReport(str(path))
    out = PromptSet([], [], [])
    for ln, rec in read_records(path, report):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(rec, dict) or ("prompt" not in rec and "prompt_ids" not in rec):
            report.add_bad(ln, "expected an object with a prompt (string or messages) or prompt_ids")
            continue
        if "prompt_ids" in rec:
            ids = [int(i) for i in rec["prompt_ids"]]
            text = str(rec.get("prompt", ""))
        else:
            if tok is None:
                raise DataError(f"{path}:{ln}: a text prompt needs a tokenizer; the model directory has none")
            p = rec["prompt"]
            messages = p if isinstance(p, list) else [{"role": "user", "content": str(p)}]
            if chat or isinstance(p, list):
                ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            else:
                ids = tok.encode(str(p))
            text = messages[-1]["content"] if isinstance(p, list) else str(p)
        if not ids or len(ids) > max_len:
            report.add_bad(ln, f"prompt of {len(ids)} tokens (allowed 1..{max_len})")
            continue
        out.ids.append(ids)
        out.texts.append(text)
        out.records.append(rec)
    if report.bad:
        _console().print(f"[bold]data[/bold] {report.summary()}")
    if not out.ids:
        raise DataError(f"{path}: no usable prompt")
    return out


# --------------------------------------------------------------------------------------------- rewards
class Scorer:
    """Rollouts -> rewards, from a verifiable function or a reward model (which must share the tokenizer).

    A reward model reads each rollout the way it was trained on preference pairs: for a chat prompt, the prompt
    messages plus the response as the assistant's turn, rendered by the chat template -- end-of-turn tokens
    included (``<|im_end|>\n`` for ChatML), which is where the reward head reads its score. Prompt ids plus the
    sampled ids would end elsewhere (on the end-of-sequence token, or mid-sentence when cut at max_new_tokens),
    a position the head never saw in training. Plain-text prompts are scored as prompt ids + response ids."""

    def __init__(self, spec: Any, tok: Any, device: torch.device, policy_vocab: int, chat: bool = True):
        self.fn = None
        self.rm = None
        self.tok, self.chat = tok, chat
        if spec.function is not None:
            self.fn = load_reward_function(spec.function, spec.schema_)
        else:
            from lmstack.rl.reward_model import load_reward_model

            if not Path(spec.model).is_dir():
                raise ConfigError(f"reward.model: {spec.model} is not a directory (train one with "
                                  "`lmstack align reward`)")
            self.rm = load_reward_model(spec.model, device=device, dtype=torch.float32)
            if self.rm.config.vocab_size != policy_vocab:
                raise ConfigError(f"reward.model has vocab_size {self.rm.config.vocab_size}, the policy "
                                  f"{policy_vocab}: the reward model must use the policy's tokenizer")
        self.device = device

    @torch.no_grad()
    def __call__(self, rolls: list[Rollout], texts: list[str]) -> list[float]:
        if self.fn is not None:
            recs = [{**r.record, "response_ids": r.response_ids} for r in rolls]
            return score_all(self.fn, texts, [r.text for r in rolls], recs)
        seqs = [self.rm_input(r) for r in rolls]
        out: list[float] = []
        for i in range(0, len(seqs), 16):
            chunk = seqs[i:i + 16]
            L = max(len(s) for s in chunk)
            ids = torch.zeros((len(chunk), L), dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for b, full in enumerate(chunk):
                ids[b, :len(full)] = torch.tensor(full)
                mask[b, :len(full)] = 1
            out += self.rm(ids.to(self.device), mask.to(self.device)).tolist()
        return out

    def rm_input(self, r: Rollout) -> list[int]:
        """The token ids the reward model scores for one rollout (the class docstring)."""
        p = r.record.get("prompt") if "prompt_ids" not in r.record else None
        if self.tok is not None and p is not None and (self.chat or isinstance(p, list)):
            messages = p if isinstance(p, list) else [{"role": "user", "content": str(p)}]
            return list(self.tok.render_chat([*messages, {"role": "assistant", "content": r.text}]).input_ids)
        return list(r.prompt_ids) + list(r.response_ids)


# --------------------------------------------------------------------------------------------- the policy
@dataclass
class Policy:
    model: nn.Module
    tok: Any
    pad: int
    device: torch.device
    engine: Any
    save: Callable[[Path], None]
    reference: Callable[[], contextlib.AbstractContextManager]  # a context in which ``ref_model`` is the reference
    ref_model: nn.Module
    params: list[nn.Parameter] = field(default_factory=list)


def load_policy(cfg: Any) -> Policy:
    from lmstack.model import copy_tokenizer, load_model, save_model
    from lmstack.tune.adapters import save_lora_adapter
    from lmstack.tune.lora import apply_lora, lora_disabled
    from lmstack.tune.sft import lora_spec, pad_id_of
    from lmstack.utils.device import resolve_device

    if not Path(cfg.model).is_dir():
        raise ConfigError(f"model: {cfg.model} is not a model directory")
    dev = resolve_device(cfg.train.device)
    model = load_model(cfg.model, device=dev, dtype=torch.float32)
    tok_dir = cfg.tokenizer or cfg.model
    tok = None
    if (Path(tok_dir) / "tokenizer.json").is_file():
        from lmstack.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tok_dir)
    pad = pad_id_of(tok) if tok is not None else int(model.config.pad_token_id or 0)
    torch.manual_seed(cfg.train.seed)
    if cfg.method == "lora":
        spec = lora_spec(cfg.lora)
        for p in model.parameters():
            p.requires_grad_(False)
        apply_lora(model, spec)
        ref_model = model

        def reference() -> contextlib.AbstractContextManager:
            return lora_disabled(model)

        def save(out: Path) -> None:
            save_lora_adapter(model, out, spec, str(cfg.model))
            if tok is not None:
                copy_tokenizer(tok_dir, out)
    else:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(True)
        reference = contextlib.nullcontext

        def save(out: Path) -> None:
            save_model(model, out, tokenizer_dir=tok_dir if tok is not None else None)
    r = cfg.rollout
    max_len = cfg.data.max_prompt_len + r.max_new_tokens + 1
    engine = make_engine(model, tok, max_num_seqs=r.max_num_seqs, max_model_len=max_len,
                         kv_cache_memory=r.kv_cache_memory)
    params = [p for p in model.parameters() if p.requires_grad]
    return Policy(model, tok, pad, dev, engine, save, reference, ref_model, params)


# --------------------------------------------------------------------------------------------- evaluation
def evaluate(policy: Policy, prompts: PromptSet, scorer: Scorer, max_new_tokens: int, show: int = 4
             ) -> dict[str, Any]:
    """Greedy responses to the held-out prompts: mean reward, the fraction scoring >= 1 (accuracy for 0/1
    rewards), mean length, and a few samples."""
    if not len(prompts):
        return {}
    rolls = generate(policy.engine, prompts.ids, prompts.records, n=1, max_new_tokens=max_new_tokens,
                     temperature=0.0)
    rewards = scorer(rolls, prompts.texts)
    by_lang: dict[str, list[float]] = {}
    for rec, w in zip(prompts.records, rewards):
        if rec.get("lang") is not None:
            by_lang.setdefault(str(rec["lang"]), []).append(w)
    return {"val_reward": sum(rewards) / len(rewards),
            "val_accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
            "val_response_len": sum(len(r.response_ids) for r in rolls) / len(rolls),
            # prompts tagged with a ``lang`` (the arithmetic task: en / zh): accuracy per language, and its count
            **{f"val_accuracy_{k}": sum(w >= 1.0 for w in ws) / len(ws) for k, ws in sorted(by_lang.items())},
            "n_by_lang": {k: len(ws) for k, ws in sorted(by_lang.items())},
            "n": len(rolls),
            "samples": [{"prompt": t, "response": r.text, "reward": w}
                        for t, r, w in list(zip(prompts.texts, rolls, rewards))[:show]]}


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class Run:
    """A training run's files and its prompt sampler (epochs of shuffled prompts)."""

    run_dir: Path
    cfg: Any
    train: PromptSet
    val: PromptSet | None
    scorer: Scorer
    policy: Policy
    rng: random.Random = field(default_factory=random.Random)
    order: list[int] = field(default_factory=list)
    logger: Any = None
    before: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def next_prompts(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    def log(self, rec: dict[str, Any]) -> None:
        rec = {k: v for k, v in rec.items() if not (isinstance(v, float) and not math.isfinite(v))}
        self.logger.log(rec)

    def maybe_eval(self, step: int, last: bool = False) -> dict[str, Any] | None:
        every = self.cfg.train.eval_every
        if self.val is None or not (last or (every and step % every == 0)):
            return None
        res = evaluate(self.policy, self.val, self.scorer, self.cfg.rollout.max_new_tokens)
        self.log({"step": step, **{k: v for k, v in res.items() if k.startswith("val_")}})
        _console().print(f"step {step}: held-out reward {res['val_reward']:.3f} (accuracy {res['val_accuracy']:.3f})")
        return res


def start_run(cfg: Any, section: str) -> Run:
    from lmstack.train.checkpoint import write_config
    from lmstack.train.metrics import MetricsLogger
    from lmstack.utils.device import seed_everything

    if cfg.reward.function is not None:
        load_reward_function(cfg.reward.function, cfg.reward.schema_)  # a bad name fails before any model loads
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    policy = load_policy(cfg)
    d = cfg.data
    train = load_prompts(d.path, policy.tok, d.chat, d.max_prompt_len)
    val = load_prompts(d.val_path, policy.tok, d.chat, d.max_prompt_len, d.val_limit) if (
        d.val_path and d.val_limit) else None
    scorer = Scorer(cfg.reward, policy.tok, policy.device, policy.model.config.vocab_size, chat=cfg.data.chat)
    for stale in ("metrics.jsonl",):
        if (run_dir / stale).exists():
            (run_dir / stale).unlink()
    logger = MetricsLogger(run_dir, tensorboard=False)
    write_config(cfg, run_dir / "config.yaml")
    run = Run(run_dir, cfg, train, val, scorer, policy, random.Random(cfg.train.seed), logger=logger)
    _console().print(f"[bold]{section}[/bold] {len(train)} prompts, {len(val) if val else 0} held-out; "
                     f"{sum(p.numel() for p in policy.params):,} trainable parameters ({cfg.method})")
    run.before = run.maybe_eval(0, last=True) or {}
    return run


def finish_run(run: Run, steps: int) -> dict[str, Any]:
    after = run.maybe_eval(steps, last=True) or {}
    final = run.run_dir / "final"
    run.policy.save(final)
    run.logger.plot()
    plot_rewards(run.logger.records, run.run_dir / "rewards.png")
    run.logger.close()
    summary = {"steps": steps, "seconds": round(time.perf_counter() - run.t0, 1), "before": run.before,
               "after": after, "final_dir": str(final)}
    atomic_write_json(run.run_dir / "rl_eval.json", summary)
    return summary


def plot_rewards(records: list[dict[str, Any]], dest: Path) -> Path | None:
    """Training reward (mean ± std) and the held-out reward per step."""
    tr = [(r["step"], r["reward_mean"], r.get("reward_std", 0.0)) for r in records if "reward_mean" in r]
    va = [(r["step"], r["val_reward"]) for r in records if "val_reward" in r]
    if not tr and not va:
        return None
    from lmstack.utils.plot import new_figure, save_png

    fig = new_figure(7, 4)
    ax = fig.subplots()
    if tr:
        s, m, sd = zip(*tr)
        ax.plot(s, m, lw=1, label="rollout reward (mean)")
        ax.fill_between(s, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
    if va:
        ax.plot(*zip(*va), "o-", ms=4, label="held-out reward (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, dest)


def minibatches(n: int, k: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    size = max(1, math.ceil(n / k))
    for i in range(0, n, size):
        yield perm[i:i + size]


def optimizer_for(policy: Policy, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(policy.params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
