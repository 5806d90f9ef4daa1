"""``lmstack align ppo``: RLHF with Proximal Policy Optimization (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), the way TRL's PPOTrainer and OpenAI's lm-human-preferences do it, at CPU size.

The critic is a value head (hidden -> 1) on the policy's own final hidden states (shared backbone: one model
in memory); the reference is the policy with its LoRA adapter off. Reads top to bottom, one step per turn:

1. sample one response per prompt through the engine, with its log-probs;
2. score each response (reward model or verifiable function);
3. one no-grad forward: old values V(s_t); the reference log-probs (adapter off);
4. per-token rewards ``-β (log π_old - log π_ref)``, the score added at the last token; GAE (γ, λ) ->
   advantages and returns; advantages whitened;
5. ``ppo_epochs`` × ``minibatches`` updates of ``clipped surrogate + vf_coef · clipped value loss``;
6. β follows the adaptive controller when ``target_kl`` is set.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lmstack.rl.config import PPOConfig
from lmstack.rl.losses import (AdaptiveKL, gae, kl_shaped_rewards, masked_mean, masked_whiten, ppo_policy_loss,
                               ppo_value_loss)
from lmstack.rl.policy import finish_run, minibatches, start_run
from lmstack.rl.rollout import collate, eval_mode, generate, logps_from_hidden, response_hidden, response_logps


def align_ppo(cfg: PPOConfig) -> dict[str, Any]:
    run = start_run(cfg, "ppo")
    policy, p, r = run.policy, cfg.ppo, cfg.rollout
    model = policy.model
    H = model.config.hidden_size
    value_head = nn.Linear(H, 1, device=policy.device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    opt = torch.optim.AdamW([*policy.params, *value_head.parameters()], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay, betas=(0.9, 0.99))
    kl_ctl = AdaptiveKL(p.kl_coef, p.target_kl, p.horizon)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for step in range(1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        idx = run.next_prompts(p.prompts_per_step)
        rolls = generate(policy.engine, [run.train.ids[i] for i in idx], [run.train.records[i] for i in idx], n=1,
                         max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                         seed=cfg.train.seed * 1_000_003 + step * len(idx))
        t_gen = time.perf_counter() - t0
        scores = torch.tensor(run.scorer(rolls, [run.train.texts[i] for i in idx]), dtype=torch.float32)
        batch = collate(rolls, policy.pad).to(policy.device)
        mask = batch.mask
        with torch.no_grad(), eval_mode(model):
            h = response_hidden(model, batch)
            old_v = value_head(h).squeeze(-1) * mask
            old = batch.old_logps if r.temperature == 1.0 else logps_from_hidden(model, h, batch, r.temperature)[0]
            with policy.reference():
                ref = response_logps(policy.ref_model, batch, r.temperature)
        batch.old_logps = old
        sc = scores.to(policy.device)
        if p.whiten_rewards and len(rolls) > 1:
            sc = (sc - sc.mean()) / (sc.std() + 1e-8)
        rewards, kl = kl_shaped_rewards(sc, old, ref, mask, kl_ctl.value)
        adv, returns = gae(rewards, old_v, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask)
        model.train()
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(p.ppo_epochs):
            for mb in minibatches(len(rolls), p.minibatches, gen):
                mb = mb.to(policy.device)
                b = batch.select(mb)
                h = response_hidden(model, b)
                lp, ent = logps_from_hidden(model, h, b, r.temperature, entropy=True)
                v = value_head(h).squeeze(-1)
                pl, pm = ppo_policy_loss(lp, b.old_logps, adv[mb], b.mask, p.cliprange)
                vl, vm = ppo_value_loss(v, old_v[mb], returns[mb], b.mask, p.cliprange_value)
                loss = pl + p.vf_coef * vl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_([*policy.params, *value_head.parameters()],
                                                    cfg.train.max_grad_norm)
                opt.step()
                n_updates += 1
                for k, val in {**pm, **vm, "policy_loss": float(pl.detach()), "value_loss": float(vl.detach()),
                               "loss": float(loss.detach()), "grad_norm": float(gn),
                               "entropy": float(masked_mean(ent, b.mask))}.items():
                    sums[k] = sums.get(k, 0.0) + val
        model.eval()
        seq_kl = float(kl.sum(1).mean())
        beta = kl_ctl.value
        kl_ctl.update(seq_kl, len(rolls))
        lens = [len(x.response_ids) for x in rolls]
        rec = {"step": step, **{k: val / n_updates for k, val in sums.items()},
               "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(rolls) > 1 else 0.0,
               "kl": seq_kl, "kl_coef": beta, "non_score_reward": float((-beta * kl).sum(1).mean()),
               "response_len": sum(lens) / len(lens), "rollout_s": round(t_gen, 3),
               "step_s": round(time.perf_counter() - t0, 3), "lr": cfg.train.lr}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            run.log(rec)
            run.logger.plot()
        if step < cfg.train.steps:
            run.maybe_eval(step)
    summary = finish_run(run, cfg.train.steps)
    from safetensors.torch import save_file

    save_file({k: t.detach().cpu().contiguous() for k, t in value_head.state_dict().items()},
              str(run.run_dir / "final" / "value_head.safetensors"))
    return summary
