"""The rlsupport app's stages.

pairs   preference pairs from a finished support run (lmstack run recipes/quickstart.yaml): each grounded chat's
        answer citing its passage (chosen) against one of four bad answers, in turn (rejected):
        ``wrong_passage`` (a sentence of another shown passage, cited as that one), ``wrong_citation`` (the
        right sentence, another passage's number), ``hallucinated`` (the right sentence with its numbers
        changed), ``ungrounded`` (no answer, no citation, though the passage has it). Held-out pairs come from
        the held-out questions (never in the chats); PPO prompts from the chats; held-out prompts from the
        held-out questions.
policy  the SFT assistant as one model directory (the support run's base + its LoRA, merged) and the reward
        model's backbone (its first ``reward_layers`` layers: the same tokenizer at a fraction of the cost).
reward  / ppo: the library's stages.
eval    the support scores of the SFT assistant and of SFT + the PPO adapter on the held-out questions:
        exact match and token F1 of the answer (citation removed), citation rate and correctness (the cited
        passage is the one holding the answer), and the reward model's score.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from lmstack.pipeline import Recipe, StageContext
from lmstack.utils.io import atomic_write_json, write_jsonl

KINDS = ("wrong_passage", "wrong_citation", "hallucinated", "ungrounded")
UNGROUNDED = {"en": "I'm not sure about that. Please contact our support team.",
              "zh": "这个我不太清楚，请联系我们的客服团队。"}
_PASSAGE = re.compile(r"^\[(\d{1,2})\] ", re.M)
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s*")


def section(recipe: Recipe, name: str) -> Any:
    from lmstack.apps.rlsupport.pipeline import APP

    return APP.registry[name].configure(recipe)


def support_run(r: Recipe) -> Path:
    return Path(section(r, "pairs").support_run)


def pairs_dir(r: Recipe) -> Path:
    return r.run_path / "pairs"


def policy_dir(r: Recipe) -> Path:
    return r.run_path / "policy" / "model"


def rm_init_dir(r: Recipe) -> Path:
    return r.run_path / "policy" / "rm_init"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passages(system: str) -> dict[int, str]:
    """The numbered passages of a grounded system message (``[1] ...`` up to the next ``[2] ...``)."""
    parts = _PASSAGE.split(system)
    return {int(parts[i]): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def _sentences(passage: str) -> list[str]:
    out = []
    for line in passage.splitlines():
        line = line.strip()
        if line.startswith("Q:"):
            continue
        line = line[2:].strip() if line.startswith("A:") else line
        line = line.lstrip("-*• ").strip()
        out += [s.strip() for s in _SENTENCE.split(line) if len(s.strip()) > 12 and s.strip()[-1] in ".!?。！？"]
    return out


def _lang(text: str) -> str:
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def bad_answer(kind: str, answer: str, k: int, shown: dict[int, str], rng: random.Random) -> str | None:
    """One rejected answer of ``kind`` for ``answer`` (taken from passage ``k``), or None when it cannot be made."""
    others = [j for j in shown if j != k]
    if kind == "wrong_citation":
        return f"{answer} [{rng.choice(others)}]" if others else None
    if kind == "wrong_passage":
        cands = [(j, s) for j in others for s in _sentences(shown[j]) if s not in shown[k] and s != answer]
        if not cands:
            return None
        j, s = rng.choice(cands)
        return f"{s} [{j}]"
    if kind == "hallucinated":
        if not re.search(r"\d", answer):
            return None
        changed = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.choice((1, 2, 3, 5, 10))), answer)
        return f"{changed} [{k}]" if changed != answer else None
    return UNGROUNDED[_lang(answer)]


def _pair(prompt: list[dict], answer: str, k: int, shown: dict[int, str], turn: int, rng: random.Random
          ) -> dict[str, Any] | None:
    for i in range(len(KINDS)):
        kind = KINDS[(turn + i) % len(KINDS)]
        bad = bad_answer(kind, answer, k, shown, rng)
        if bad is not None:
            return {"prompt": prompt, "chosen": f"{answer} [{k}]", "rejected": bad, "kind": kind}
    return None


def run_pairs(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.support.retrieval import CITATION, citation_numbers
    from lmstack.errors import ConfigError

    c = ctx.config
    rag = Path(c.support_run) / "rag"
    if not (rag / "sft_train.jsonl").is_file():
        raise ConfigError(f"pairs.support_run: {c.support_run} has no rag/sft_train.jsonl; run the support "
                          "recipe first (lmstack run recipes/quickstart.yaml) or point support_run at its run_dir")
    rng = random.Random(ctx.recipe.seed)
    seen: set[str] = set()
    chats = []
    for rec in _read_jsonl(rag / "sft_train.jsonl"):
        msgs = rec["messages"]
        if len(msgs) != 3 or [m["role"] for m in msgs] != ["system", "user", "assistant"]:
            continue
        nums = citation_numbers(msgs[2]["content"])
        key = msgs[1]["content"] + "\x00" + msgs[0]["content"]
        if len(nums) != 1 or key in seen:
            continue
        seen.add(key)
        shown = passages(msgs[0]["content"])
        if nums[0] not in shown:
            continue
        chats.append((msgs[:2], CITATION.sub("", msgs[2]["content"]).strip(), nums[0], shown))
    rng.shuffle(chats)
    train = [p for t, (pr, a, k, sh) in enumerate(chats[:c.train_pairs]) if (p := _pair(pr, a, k, sh, t, rng))]
    prompts = [{"prompt": pr, "answer": a, "k": k} for pr, a, k, _ in chats[:c.ppo_prompts]]
    held, held_prompts = [], []
    rows = _read_jsonl(rag / "heldout_qa.jsonl")
    rng.shuffle(rows)  # both languages in the held-out subsets
    for t, row in enumerate(rows):
        if row.get("gold") not in (row.get("context") or []):
            continue  # retrieval missed the passage: no right answer to cite
        k = row["context"].index(row["gold"]) + 1
        shown = passages(row["messages"][0]["content"])
        pr = row["messages"][:2]
        if len(held) < c.heldout_pairs and (p := _pair(pr, row["answer"], k, shown, t, rng)):
            held.append(p)
        if len(held_prompts) < c.heldout_prompts:
            held_prompts.append({"prompt": pr, "answer": row["answer"], "k": k, "lang": row.get("lang"),
                                 "id": row.get("id")})
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_pairs", train), ("heldout_pairs", held), ("ppo_prompts", prompts),
                       ("heldout_prompts", held_prompts)):
        write_jsonl(out / f"{name}.jsonl", rows)
    kinds = {k: sum(p["kind"] == k for p in train) for k in KINDS}
    ctx.log(f"{len(train)} train pairs {kinds}, {len(held)} held-out pairs, {len(prompts)} PPO prompts, "
            f"{len(held_prompts)} held-out prompts")
    return {"train_pairs": len(train), "heldout_pairs": len(held), "kinds": kinds, "ppo_prompts": len(prompts),
            "heldout_prompts": len(held_prompts)}


def run_policy(ctx: StageContext) -> dict[str, Any]:
    """The SFT assistant (base + LoRA merged) and the reward model's (shallower) backbone."""
    from lmstack.errors import ConfigError
    from lmstack.model import load_model, save_model
    from lmstack.tune.merge import merge_adapter

    run = support_run(ctx.recipe)
    base, adapter = run / "base" / "model", run / "finetune" / "final"
    if not (base / "config.json").is_file():
        raise ConfigError(f"pairs.support_run: {run} has no base/model (the support recipe's base stage)")
    out = ctx.out_dir
    if (adapter / "adapter_config.json").is_file():
        merge_adapter(base, adapter, out / "model")
    else:
        import shutil

        shutil.copytree(adapter if (adapter / "config.json").is_file() else base, out / "model", dirs_exist_ok=True)
    n = ctx.config.reward_layers
    model = load_model(out / "model", device="cpu", dtype="float32")
    total = model.config.num_hidden_layers
    if n is not None and n < total:
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n]
    save_model(model, out / "rm_init", tokenizer_dir=out / "model")
    ctx.log(f"SFT policy {out / 'model'} ({total} layers); reward backbone {min(n or total, total)} layers")
    return {"policy": str(out / "model"), "reward_backbone_layers": min(n or total, total), "layers": total}


# ------------------------------------------------------------------------------------------------ eval
def _generate(model_dir: Path, adapter: Path | None, prompts: list[dict[str, Any]], max_tokens: int) -> list[str]:
    import torch

    from lmstack.model import load_model
    from lmstack.rl.rollout import generate, make_engine
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    if adapter is not None:
        from lmstack.tune.adapters import load_adapter
        from lmstack.tune.lora import merge_lora

        load_adapter(model, adapter)
        merge_lora(model)
    ids = [list(tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True)) for p in prompts]
    eng = make_engine(model, tok, max_num_seqs=16, max_model_len=max(len(i) for i in ids) + max_tokens + 1,
                      kv_cache_memory=256 << 20)
    return [r.text for r in generate(eng, ids, prompts, n=1, max_new_tokens=max_tokens, temperature=0.0)]


def support_scores(prompts: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """EM and F1 of the answer text (citation removed) against the gold answer, the share of answers that cite,
    and the share of citing answers that cite the passage holding the answer -- overall and per language."""
    from lmstack.apps.support.retrieval import CITATION, citation_numbers
    from lmstack.eval.metrics import exact_match, token_f1

    rows = []
    for p, a in zip(prompts, answers):
        nums = citation_numbers(a)
        text = CITATION.sub("", a).strip()
        rows.append((p.get("lang") or "all", exact_match(text, p["answer"]), token_f1(text, p["answer"]),
                     bool(nums), bool(nums) and p["k"] in nums and len(nums) == 1))
    out: dict[str, Any] = {}
    for lang in ["all", *sorted({r[0] for r in rows} - {"all"})]:
        sub = [r for r in rows if lang == "all" or r[0] == lang]
        if not sub:
            continue
        cited = [r for r in sub if r[3]]
        out[lang] = {"n": len(sub), "exact_match": sum(r[1] for r in sub) / len(sub),
                     "f1": sum(r[2] for r in sub) / len(sub), "cited": len(cited) / len(sub),
                     "citation_correct": sum(r[4] for r in cited) / max(1, len(cited))}
    return out


def _rm_scores(rm_dir: Path, model_dir: Path, prompts: list[dict[str, Any]], answers: list[str]) -> float:
    import torch

    from lmstack.rl.reward_model import load_reward_model
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    rm = load_reward_model(rm_dir, device="cpu", dtype=torch.float32)
    scores = []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            ids = list(tok.render_chat(p["prompt"] + [{"role": "assistant", "content": a}]).input_ids)
            t = torch.tensor([ids])
            scores.append(float(rm(t, torch.ones_like(t))[0]))
    return sum(scores) / max(1, len(scores))


def run_eval(ctx: StageContext) -> dict[str, Any]:
    import torch

    from lmstack.rl.reward_model import load_reward_model  # noqa: F401 (fail early when rl is broken)

    c = ctx.config
    if c.threads:
        torch.set_num_threads(c.threads)
    r = ctx.recipe
    prompts = _read_jsonl(pairs_dir(r) / "heldout_prompts.jsonl")
    rm_dir = Path(section(r, "reward").run_dir) / "final"
    res: dict[str, Any] = {}
    samples = []
    systems = [("sft", None)]
    if "ppo" in r.stages:
        systems.append(("ppo", Path(section(r, "ppo").run_dir) / "final"))
    for name, adapter in systems:
        answers = _generate(policy_dir(r), adapter, prompts, c.max_tokens)
        res[name] = {**support_scores(prompts, answers)}
        if (rm_dir / "config.json").is_file():
            res[name]["reward"] = _rm_scores(rm_dir, policy_dir(r), prompts, answers)
        samples.append({name: answers[:8]})
        a = res[name]["all"]
        ctx.log(f"{name}: EM {a['exact_match']:.3f}, F1 {a['f1']:.3f}, cited {a['cited']:.3f}, citation correct "
                f"{a['citation_correct']:.3f}, reward {res[name].get('reward', float('nan')):.3f}")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.out_dir / "scores.json", {"systems": res, "samples": samples,
                                                   "questions": [p["prompt"][-1]["content"] for p in prompts[:8]]})
    return {"systems": res}
