"""``fit``: the one training loop. Pretraining, full fine-tuning, LoRA, QLoRA, prefix tuning, SFT, DPO and
distillation all call it with their own model, batch source and loss; none is a separate trainer.

THE CONTRACT (stable; other stages build on it)::

    from lmstack.train import TrainConfig, LossOutput, fit

    def loss_fn(model, batch) -> LossOutput:          # call model(...) -- it may be DDP-wrapped
        logits = model(batch["input_ids"])             # (B, T, V)
        ...
        return LossOutput(loss=mean_loss, num_tokens=n, metrics={"acc": 0.5})

    result = fit(
        model,            # nn.Module: lmstack Transformer, possibly with LoRA / quantized module swaps
        train_data,       # stateful batch source: next(train_data) -> dict[str, Tensor];
                          #   .state_dict() / .load_state_dict(sd) for exact resume (optional: without them
                          #   a resumed run restarts the data stream)
        loss_fn,          # (model, batch) -> LossOutput(loss: scalar Tensor = mean over num_tokens,
                          #   num_tokens: int, metrics: dict[str, float] averaged per step in the log)
        cfg,              # TrainConfig: steps, lr, schedule, grad_accum, clip, eval/ckpt cadence, resume, ...
        run_dir,          # runs/NAME: config.yaml, metrics.jsonl, loss.png, checkpoints/step_XXXXXX/, final/
        val_data=None,    # callable returning a fresh iterable of batches (or None)
        params=None,      # parameters to optimise (default: those with requires_grad)
        save_model_fn=None,  # (model, out_dir) -> None; default: lmstack.model.save_model (HF directory)
                             #   + tokenizer files from tokenizer_dir; LoRA passes an adapter writer
        tokenizer_dir=None,
        run_config=None,  # the stage's full resolved config (pydantic) for config.yaml; default cfg
    ) -> FitResult(final_dir, steps, last_loss, best_val_loss, metrics_path, bad_steps, stopped)

What one optimizer step does: ``cfg.grad_accum`` micro-batches, each loss backpropagated with weight
``num_tokens``, and the gradients normalised by the tokens of the whole step summed over all processes, so
the update is
the token-weighted mean loss of the global batch whatever the micro-batching or process count (the fix
for the gradient-accumulation bias discussed in transformers#34191). Then clipping, AdamW, the lr of
:func:`lmstack.train.optim.lr_at`.

A NaN/inf loss or gradient norm skips the update (counted as ``bad_steps``); ``cfg.max_bad_steps`` in a
row stops the run with :class:`TrainingDiverged` and leaves the checkpoints alone. SIGINT / SIGTERM finish
the current step, write a checkpoint and return with ``stopped="interrupted"``; a second Ctrl-C aborts.

Checkpoints (``run_dir/checkpoints/step_000500/``) are written to a temporary directory and renamed, so a
listed one is complete. Each is a model directory (``save_model_fn``) plus ``trainer_state.pt``
(optimizer, step, RNG states, data position, bad-step count) and ``config.yaml``; under FSDP2 the weights
and optimizer are also saved sharded in ``dcp/`` (``torch.distributed.checkpoint``). ``cfg.resume="auto"``
continues from the newest one; a killed-and-resumed CPU run reproduces the uninterrupted losses.

Model construction stays outside: ``build_model(preset("tiny"))`` or ``load_model(dir)``, then ``fit``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from lmstack.errors import Interrupted, LmstackError
from lmstack.model.moe import expert_utilization
from lmstack.train import checkpoint as ckpt
from lmstack.train import distributed as D
from lmstack.train import tensor_parallel as TP
from lmstack.train.config import TrainConfig
from lmstack.train.flops import flops_per_token, measure_matmul_peak
from lmstack.train.metrics import MetricsLogger
from lmstack.train.optim import build_optimizer, lr_at, set_lr
from lmstack.utils.device import resolve_dtype, seed_everything
from lmstack.utils.progress import progress


@dataclass
class LossOutput:
    loss: Tensor  # scalar: mean loss over num_tokens
    num_tokens: int  # tokens (or examples, for sequence-level losses) the mean is over
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FitResult:
    final_dir: Path | None  # run_dir/final (None when cfg.save_final is off or the run was interrupted)
    steps: int  # optimizer steps done (including resumed ones)
    last_loss: float
    best_val_loss: float | None
    metrics_path: Path
    bad_steps: int = 0
    stopped: str = "completed"  # "completed" | "interrupted"
    checkpoint_dir: Path | None = None  # last checkpoint written or resumed from
    signal: int | None = None  # what stopped an interrupted run: signal.SIGINT or signal.SIGTERM

    def raise_if_interrupted(self, what: str = "training") -> None:
        """For the CLI: an interrupted run becomes :class:`Interrupted` (exit 130 / 143) naming what was kept."""
        if self.stopped != "interrupted":
            return
        sig = self.signal or signal.SIGINT
        kept = (f"checkpoint {self.checkpoint_dir} kept; continue with --resume auto" if self.checkpoint_dir
                else "no checkpoint was written")
        raise Interrupted(f"{what} interrupted by {signal.Signals(sig).name} after step {self.steps}; {kept}", sig)


class BatchSource(Protocol):
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingDiverged(LmstackError):
    """The loss was NaN/inf for ``max_bad_steps`` steps in a row."""


SaveModelFn = Callable[[nn.Module, Path], None]


def fit(
    model: nn.Module,
    train_data: BatchSource | Iterator[dict[str, Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], LossOutput],
    cfg: TrainConfig,
    run_dir: str | Path,
    val_data: Callable[[], Iterable[dict[str, Tensor]]] | None = None,
    params: Iterable[nn.Parameter] | None = None,
    save_model_fn: SaveModelFn | None = None,
    tokenizer_dir: str | Path | None = None,
    run_config: BaseModel | None = None,
) -> FitResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps. See the module docstring for the contract."""
    run_dir = Path(run_dir)
    info = D.setup(cfg)
    device = info.device
    seed_everything(cfg.seed)
    amp = _autocast_dtype(cfg, device)
    model.to(device)
    model.train()
    if cfg.activation_checkpointing:
        D.apply_activation_checkpointing(model)
    if cfg.compile:
        D.apply_compile(model)
    params = list(params) if params is not None else None
    if info.sharded and save_model_fn is not None:
        raise LmstackError("train.distributed=fsdp / train.tp_size>1 with a custom save_model_fn (adapters) is not "
                           "supported; use train.distributed=ddp for adapter training")
    if info.tp_size > 1:
        from lmstack.train.losses import causal_lm_loss

        if loss_fn is not causal_lm_loss:
            raise LmstackError("train.tp_size>1 is supported for the causal-LM loss of `lmstack pretrain` only "
                               "(the logits are vocab-sharded DTensors); use ddp / fsdp for this stage")
    wrapped = D.wrap(model, info)
    if params is not None and info.sharded:
        params = None  # FSDP2 replaced the parameters with sharded ones; train those that require grad
    optimizer = build_optimizer(model, cfg, params, device)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    default_save = save_model_fn is None
    writer = ckpt.ModelWriter(model, info, save_model_fn, tokenizer_dir)

    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard, plot=cfg.plot)
    state = ckpt.TrainerState()
    resumed_from = ckpt.find_resume(cfg.resume, run_dir) if cfg.resume else None
    resumed_from = D.broadcast_object(resumed_from, info)
    if resumed_from is not None:
        state = ckpt.load(resumed_from, model, optimizer, train_data, info, default_save, trained)
        logger.truncate(state.step)
    if info.is_main:
        ckpt.write_config(run_config or cfg, run_dir / "config.yaml")

    stop = _StopFlag()
    peak = cfg.peak_flops
    fpt: float | None = None
    last_ckpt: Path | None = resumed_from
    last_loss = float("nan")
    interval_tokens, interval_time = 0.0, 0.0  # for tokens/s over the log interval (train compute only)
    t_start = time.perf_counter()
    elapsed0 = state.elapsed_s

    bar = progress(disable=None if info.is_main else True)
    with stop.installed(), bar:
        task = bar.add_task("train", total=cfg.steps, completed=state.step)
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(state.step, cfg)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            tokens = 0
            # Backward of loss * n / norm; after the step grads are rescaled by norm / (tokens of the step).
            # One process: norm = first micro-batch's tokens x grad_accum, so equal-sized micro-batches
            # need no rescale at all. Several: norm = 1 on every rank (the same weights before DDP/FSDP
            # average them), rescaled by world / global tokens.
            norm = 1.0 if info.active else None
            step_metrics: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                try:
                    batch = _to_device(next(train_data), device)
                except StopIteration:
                    raise LmstackError(
                        f"train_data ran out at step {state.step + 1} of {cfg.steps}; give fit an endless batch "
                        "source (PackedBatches cycles epochs) or lower train.steps") from None
                if fpt is None:
                    fpt = flops_per_token(model, _seq_len(batch))
                # TP: loss_parallel around forward and backward (vocab-sharded logits); else a no-op
                with TP.loss_context(model):
                    with D.no_sync(wrapped, info, micro == cfg.grad_accum - 1), _autocast(device, amp):
                        out = loss_fn(wrapped, batch)
                        n = int(out.num_tokens)
                        if norm is None:
                            norm = float(max(n, 1) * cfg.grad_accum)
                        weighted = out.loss.float() * (n / norm)
                    weighted.backward()
                loss_sum += out.loss.detach().double() * n
                tokens += n
                for k, v in out.metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
            # (loss_sum, tokens, stop flag) summed over processes: one all-reduce per step
            stats = torch.tensor([loss_sum.item(), float(tokens), float(stop.is_set)], dtype=torch.float64)
            stats = _reduce(stats, info, device)
            interrupted = stats[2].item() > 0
            global_tokens = max(stats[1].item(), 1.0)
            step_loss = stats[0].item() / global_tokens
            grad_norm = float("nan")
            ok = math.isfinite(step_loss)
            if ok:
                # DDP / FSDP average over processes: undo. Under TP each rank of a replica counted the same
                # tokens, and its gradients are not averaged: world / global tokens is right there too.
                scale = info.world_size * norm / global_tokens
                max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
                if info.tp_size > 1:  # DTensors on the tp / 2-D meshes and replicated plain tensors mixed
                    if scale != 1.0:
                        TP.scale_grads_(trained, scale)
                    grad_norm = TP.clip_grad_norm_(trained, max_norm)
                else:
                    grads = [p.grad for p in trained if p.grad is not None]
                    if grads and scale != 1.0:
                        torch._foreach_mul_(grads, scale)
                    gn = torch.nn.utils.clip_grad_norm_(trained, max_norm, foreach=True)
                    grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                ok = math.isfinite(grad_norm)
            if ok:
                optimizer.step()
                state.consecutive_bad = 0
                last_loss = step_loss
            else:
                state.bad_steps += 1
                state.consecutive_bad += 1
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += int(global_tokens)
            interval_time += time.perf_counter() - t0
            interval_tokens += global_tokens
            bar.update(task, completed=state.step,
                       description=f"train loss {step_loss:.4f}" if ok else "train (bad step skipped)")

            if state.consecutive_bad >= cfg.max_bad_steps:
                logger.log({"step": state.step, "loss": step_loss, "bad_steps": state.bad_steps})
                logger.plot()
                logger.close()
                where = f"; last good checkpoint: {last_ckpt}" if last_ckpt else " (no checkpoint was written yet)"
                raise TrainingDiverged(
                    f"loss or gradient was NaN/inf for {state.consecutive_bad} steps in a row at step "
                    f"{state.step}{where}; lower train.lr, raise train.warmup_steps or check the data")

            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                if peak is None and info.is_main:
                    peak = measure_matmul_peak(device, amp or torch.float32)
                tps = interval_tokens / max(interval_time, 1e-9)
                interval_tokens, interval_time = 0.0, 0.0
                rec = {"step": state.step, "loss": step_loss if ok else float("nan"), "lr": lr,
                       "grad_norm": grad_norm, "tokens": state.tokens_seen, "tokens_per_s": tps,
                       "mfu": (fpt or 0.0) * tps / (peak * info.world_size) if peak else None,
                       "bad_steps": state.bad_steps,
                       "elapsed_s": elapsed0 + time.perf_counter() - t_start, **step_metrics}
                util = expert_utilization(model) if info.is_main else None
                if util is not None and util.numel():  # MoE: (layers, experts) share of routed slots
                    rec["expert_utilization"] = [[round(float(x), 5) for x in row] for row in util]
                logger.log(rec)
            if val_data is not None and cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                vl = evaluate(wrapped, val_data, loss_fn, cfg, info, device, amp)
                if vl is not None:
                    state.best_val_loss = vl if state.best_val_loss is None else min(state.best_val_loss, vl)
                    logger.log({"step": state.step, "val_loss": vl, "val_ppl": _ppl(vl)})
                    logger.plot()
            # no periodic checkpoint inside a run of bad steps: the newest one stays the last good state
            due = cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and state.consecutive_bad == 0
            if due or interrupted:
                state.elapsed_s = elapsed0 + time.perf_counter() - t_start
                last_ckpt = ckpt.save(run_dir, state, model, optimizer, train_data, info, writer,
                                      run_config or cfg, cfg.keep_last)
                logger.plot()
            if interrupted:
                logger.close()
                return FitResult(None, state.step, last_loss, state.best_val_loss, logger.path,
                                 state.bad_steps, "interrupted", last_ckpt, stop.signum)

    final_dir = None
    if cfg.save_final:
        final_dir = run_dir / "final"
        writer.write_final(final_dir)
    logger.plot()
    logger.close()
    D.barrier(info)
    return FitResult(final_dir, state.step, last_loss, state.best_val_loss, logger.path,
                     state.bad_steps, "completed", last_ckpt)


@torch.no_grad()
def evaluate(model: nn.Module, val_data: Callable[[], Iterable[dict[str, Tensor]]],
             loss_fn: Callable[[nn.Module, dict[str, Tensor]], LossOutput], cfg: TrainConfig,
             info: D.DistInfo, device: torch.device, amp: torch.dtype | None) -> float | None:
    """Token-weighted mean validation loss over up to ``cfg.eval_batches`` batches (all processes)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for i, batch in enumerate(val_data()):
            if i >= cfg.eval_batches:
                break
            with _autocast(device, amp), TP.loss_context(D.unwrap(model)):
                out = loss_fn(model, _to_device(batch, device))
            total[0] += out.loss.double() * out.num_tokens
            total[1] += out.num_tokens
    finally:
        model.train()
    D.all_reduce_sum(total, info)
    return None if total[1].item() == 0 else total[0].item() / total[1].item()


# ---------------------------------------------------------------------------------------------- helpers
def _reduce(t: Tensor, info: D.DistInfo, device: torch.device) -> Tensor:
    if not info.active:
        return t
    t = t.to(device)
    D.all_reduce_sum(t, info)
    return t.cpu()


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 80 else float("inf")


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on CUDA (auto: bf16 when supported); fp32 (no autocast) on CPU by default."""
    dt = resolve_dtype(cfg.dtype, device)
    return None if dt == torch.float32 else dt


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _seq_len(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, Tensor) and v.ndim >= 2:
            return int(v.shape[-1])
    return 1


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.is_set = False
        self.signum: int | None = None

    def _handler(self, signum, frame) -> None:
        if self.is_set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.is_set = True
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
