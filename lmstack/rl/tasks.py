"""A synthetic task with a verifiable answer: multi-digit arithmetic, asked in English and in Chinese.

``write_arithmetic(out_dir)`` writes three files (disjoint questions; the same seed, the same files):

* ``sft.jsonl`` -- chats whose assistant turn is the bare answer (teaches the format);
* ``train.jsonl`` -- RL prompts ``{"prompt", "answer", "lang"}`` (the reward ``exact_answer`` reads ``answer``);
* ``heldout.jsonl`` -- the held-out prompts, scored greedily before and after RL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.utils.io import atomic_write

EN = ["What is {q}? Reply with the number only.", "Compute {q}. Answer with just the number.",
      "Calculate {q} and give only the result."]
ZH = ["{q} 等于多少？只回答数字。", "计算 {q}，只给出结果。", "请算出 {q} 的值，只写数字。"]


def question(rng: random.Random, digits: int, ops: str = "+-*") -> tuple[str, int]:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    op = rng.choice(ops)
    if op == "*":
        a, b = rng.randint(lo, hi), rng.randint(2, 9)
    else:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and b > a:
            a, b = b, a
    return f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b}[op]


def write_arithmetic(out_dir: str | Path, *, n_sft: int = 400, n_train: int = 400, n_heldout: int = 64,
                     digits: int = 2, zh_fraction: float = 0.5, seed: int = 0, ops: str = "+-*") -> dict[str, str]:
    from lmstack.errors import ConfigError

    if not ops or set(ops) - set("+-*"):
        raise ConfigError(f"ops {ops!r}: use some of + - *")
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    span = hi - lo + 1
    per_op = {"+": span * span, "-": span * (span + 1) // 2, "*": span * 8}  # a+b, a-b (a >= b), a*b (b in 2..9)
    possible = sum(per_op[o] for o in set(ops))
    if n_sft + n_train + n_heldout > possible * 3 // 4:  # rejection sampling needs slack
        raise ConfigError(f"{n_sft + n_train + n_heldout} distinct questions asked of {digits}-digit operands; "
                          f"only about {possible} exist: ask for fewer (at most {possible * 3 // 4}) or more digits")
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    files = {}
    for name, n in (("heldout", n_heldout), ("train", n_train), ("sft", n_sft)):
        rows = []
        while len(rows) < n:
            q, ans = question(rng, digits, ops)
            if q in seen:
                continue
            seen.add(q)
            lang = "zh" if rng.random() < zh_fraction else "en"
            prompt = rng.choice(ZH if lang == "zh" else EN).format(q=q)
            if name == "sft":
                rows.append({"messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": str(ans)}]})
            else:
                rows.append({"prompt": prompt, "answer": str(ans), "lang": lang})
        p = out / f"{name}.jsonl"
        with atomic_write(p) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        files[name] = str(p)
    return files
