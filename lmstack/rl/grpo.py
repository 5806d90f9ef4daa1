"""``lmstack align grpo``: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4).

Reads top to bottom, one step per loop turn:

1. take ``prompts_per_step`` prompts; the engine samples ``group_size`` responses to each (one request with
   ``n = group_size``), with the sampling log-probs;
2. score every response (a verifiable function or a reward model);
3. advantages: each response's reward minus its group's mean, divided by the group's std (``scale_rewards``;
   Dr. GRPO: not divided) -- no value model;
4. reference log-probs (LoRA: the adapter switched off) when ``beta > 0``;
5. ``num_iterations`` passes of ``minibatches`` updates with :func:`lmstack.rl.losses.grpo_loss`
   (clipped ratio + β·k3 KL; DAPO's clip-higher with ``epsilon_high``; ``loss_type`` grpo/dapo/dr_grpo).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lmstack.rl.config import GRPOConfig
from lmstack.rl.losses import group_advantages, grpo_loss, masked_mean
from lmstack.rl.policy import finish_run, minibatches, optimizer_for, start_run
from lmstack.rl.rollout import collate, eval_mode, generate, logps_from_hidden, response_hidden, response_logps


def align_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    run = start_run(cfg, "grpo")
    policy, g, r = run.policy, cfg.grpo, cfg.rollout
    model = policy.model
    opt = optimizer_for(policy, cfg.train.lr, cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    G = g.group_size
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        idx = run.next_prompts(g.prompts_per_step)
        rolls = generate(policy.engine, [run.train.ids[i] for i in idx], [run.train.records[i] for i in idx], n=G,
                         max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                         seed=cfg.train.seed * 1_000_003 + step * len(idx) * G)
        t_gen = time.perf_counter() - t0
        texts = [run.train.texts[idx[x.group]] for x in rolls]
        rewards = torch.tensor(run.scorer(rolls, texts), dtype=torch.float32)
        adv = group_advantages(rewards, G, scale=g.scale_rewards)
        batch = collate(rolls, policy.pad).to(policy.device)
        adv = adv.to(policy.device)
        with torch.no_grad(), eval_mode(model):
            old = batch.old_logps if r.temperature == 1.0 else response_logps(model, batch, r.temperature)
            ref = None
            if g.beta > 0:
                with policy.reference():
                    ref = response_logps(policy.ref_model, batch, r.temperature)
        batch.old_logps = old
        model.train()
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(g.num_iterations):
            for mb in minibatches(len(rolls), g.minibatches, gen):
                b = batch.select(mb.to(policy.device))
                h = response_hidden(model, b)
                lp, ent = logps_from_hidden(model, h, b, r.temperature, entropy=True)
                loss, met = grpo_loss(lp, b.old_logps, adv[mb.to(policy.device)], b.mask,
                                      ref_logp=None if ref is None else ref[mb.to(policy.device)], beta=g.beta,
                                      eps_low=g.epsilon, eps_high=g.epsilon_high, loss_type=g.loss_type,
                                      max_len=r.max_new_tokens)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(policy.params, cfg.train.max_grad_norm)
                opt.step()
                n_updates += 1
                for k, v in {**met, "loss": float(loss.detach()), "grad_norm": float(gn),
                             "entropy": float(masked_mean(ent, b.mask))}.items():
                    sums[k] = sums.get(k, 0.0) + v
        model.eval()
        lens = [len(x.response_ids) for x in rolls]
        grp = rewards.view(-1, G)
        rec = {"step": step, **{k: v / n_updates for k, v in sums.items()},
               "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "solved_groups": float((grp.max(1).values > grp.min(1).values).float().mean()),
               "response_len": sum(lens) / len(lens),
               "truncated": sum(x.finish_reason == "length" for x in rolls) / len(rolls),
               "rollout_s": round(t_gen, 3), "step_s": round(time.perf_counter() - t0, 3), "lr": cfg.train.lr}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            run.log(rec)
            run.logger.plot()
        if step < cfg.train.steps:
            run.maybe_eval(step)
    return finish_run(run, cfg.train.steps)
