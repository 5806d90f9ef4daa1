"""Multiple-choice scoring throughput: lmstack vs lm-evaluation-harness's ``hf`` backend, same model, same task,
same process.

    .venv/bin/python benchmarks/eval.py [--model DIR] [--items 200] [--threads 2] [--continuation letter|text]

Without ``--model`` a random Llama (4 layers, 256 wide, byte-level BPE tokenizer) is built in a temp dir.
The task is the shipped ``mc_en`` (MMLU layout; letters or option texts scored) repeated with rotated options to ``--items``
questions, exported to an lm-eval task by ``lmstack.eval.lmeval_task`` so both sides score identical
(context, continuation) pairs. Two measurements:

1. scoring only: ``EvalLM.loglikelihood(pairs)`` vs lm-eval ``HFLM.loglikelihood(instances)`` (batch 16);
2. end to end: ``lmstack.eval.run_eval`` vs ``lm_eval.simple_evaluate(model="hf")`` (dataset build included).

Prints examples/s for each and the ratio lmstack / hf, and checks the accuracies are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")

import torch  # noqa: E402


def build_model(out: Path, hidden: int, layers: int) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    src = Path(__file__).resolve().parents[1] / "lmstack" / "eval" / "data"
    corpus = [p.read_text(encoding="utf-8") for p in src.iterdir() if p.suffix in (".txt", ".jsonl", ".csv")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 2048}))
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


def build_task(tmp: Path, items: int, continuation: str = "letter") -> Path:
    src = Path(__file__).resolve().parents[1] / "lmstack" / "eval" / "data" / "mc_en.jsonl"
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(0)
    data = tmp / f"mc_bench_{continuation}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(items):
            r = rows[i % len(rows)]
            k = rng.randrange(4)
            choices = r["choices"][k:] + r["choices"][:k]
            gold = choices.index(r["choices"]["ABCD".index(r["answer"])])
            q = r["question"] if i < len(rows) else f"{r['question']} (variant {i // len(rows)})"  # no duplicates
            f.write(json.dumps({"question": q, "choices": choices, "answer": gold}) + "\n")
    y = tmp / f"mc_bench_{continuation}.yaml"
    y.write_text(f"type: multiple_choice\ndata: {data}\nchoices_field: choices\nsubject: general knowledge\n"
                 f"continuation: {continuation}\n")
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--continuation", choices=["letter", "text"], default="letter",
                    help="letter: score ' A'..' D' (MMLU); text: score each option's text (ARC style)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lmstack-bench-eval-"))
    model_dir = Path(args.model) if args.model else build_model(tmp / "model", args.hidden, args.layers)
    task_yaml = build_task(tmp, args.items, args.continuation)

    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmstack.eval.choice import mc_requests
    from lmstack.eval.lm import EvalLM
    from lmstack.eval.lmeval_task import export_lm_eval_task
    from lmstack.eval.run import run_eval
    from lmstack.eval.task import load_task

    task = load_task(task_yaml)
    name = export_lm_eval_task(task, tmp / "lm_eval_tasks")
    _, pairs, _ = mc_requests(task)
    print(f"model {model_dir} | {args.items} questions, {len(pairs)} (context, continuation) pairs, "
          f"{args.continuation} scoring | threads {args.threads}")

    ours = EvalLM.load(model_dir, dtype="fp32", device="cpu")
    hf = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=16)
    insts = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
    ours.loglikelihood(pairs[:8])  # warm up both
    hf.loglikelihood(insts[:8], disable_tqdm=True)

    t = time.perf_counter()
    a = ours.loglikelihood(pairs)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    b = hf.loglikelihood(insts, disable_tqdm=True)
    t_hf = time.perf_counter() - t
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    print(f"scoring only  lmstack {args.items / t_ours:8.1f} ex/s ({t_ours:.2f} s) | lm-eval hf "
          f"{args.items / t_hf:8.1f} ex/s ({t_hf:.2f} s) | ratio lmstack/hf {t_hf / t_ours:.2f}x | "
          f"max |dlogprob| {diff:.2e}")

    t = time.perf_counter()
    r_ours = run_eval(model_dir, [task_yaml], lm=ours, show_progress=False)["tasks"][task.name]["metrics"]["acc"]
    t_ours = time.perf_counter() - t
    tm = TaskManager(include_path=str(tmp / "lm_eval_tasks"), include_defaults=False)
    t = time.perf_counter()
    res = lm_eval.simple_evaluate(model=hf, tasks=[name], task_manager=tm, verbosity="ERROR")
    t_hf = time.perf_counter() - t
    r_hf = res["results"][name]["acc,none"]
    print(f"end to end    lmstack {args.items / t_ours:8.1f} ex/s ({t_ours:.2f} s) | lm-eval hf "
          f"{args.items / t_hf:8.1f} ex/s ({t_hf:.2f} s) | ratio lmstack/hf {t_hf / t_ours:.2f}x | "
          f"acc lmstack {r_ours:.4f} lm-eval {r_hf:.4f}")


if __name__ == "__main__":
    main()
