"""Export an lmstack multiple-choice task as an lm-evaluation-harness task (YAML + normalised JSONL).

The JSONL holds ``question``, ``choices`` and ``gold`` (0-based) as lmstack parsed them; the YAML's
``doc_to_text`` reproduces lmstack's MMLU layout, so both harnesses score identical (context, continuation)
pairs. Run it with ``python -m lmstack.eval.harness --model lmstack|hf ... --include_path OUT --tasks NAME``.
Only 0-shot tasks without a custom ``prompt`` are exported (lm-eval samples its own few-shot examples).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmstack.errors import ConfigError
from lmstack.eval.choice import LETTERS, _header, _mc_records, mc_item
from lmstack.eval.task import MultipleChoiceTask, load_task
from lmstack.utils.io import atomic_write, atomic_write_text


def export_lm_eval_task(spec, out_dir: str | Path, name: str | None = None) -> str:
    """Write ``OUT/NAME.yaml`` and ``OUT/NAME.jsonl``; return the lm-eval task name."""
    task = load_task(spec) if not isinstance(spec, MultipleChoiceTask) else spec
    if not isinstance(task, MultipleChoiceTask):
        raise ConfigError(f"task {task.name}: only multiple_choice tasks can be exported to lm-eval")
    if task.prompt or task.num_fewshot:
        raise ConfigError(f"task {task.name}: export supports 0-shot tasks without a custom prompt")
    name = name or f"lmstack_{task.name}"
    out = Path(out_dir)
    recs = _mc_records(task, task.data).items
    recs = recs[:task.limit] if task.limit else recs
    data = out / f"{name}.jsonl"
    n_choices = set()
    with atomic_write(data) as f:
        for r in recs:
            q, choices, gold = mc_item(task, r)
            n_choices.add(len(choices))
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}, ensure_ascii=False) + "\n")
    if task.continuation == "letter":
        text = (_header(task) + "{{ question.strip() }}\n"
                "{% for c in choices %}{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[loop.index0] }}. {{ c }}\n{% endfor %}Answer:")
        if len(n_choices) != 1:
            raise ConfigError(f"task {task.name}: letter scoring export needs the same number of choices per item")
        doc_to_choice = list(LETTERS[:n_choices.pop()])
    else:
        text = "Question: {{ question }}\nAnswer:"
        doc_to_choice = "{{ choices }}"
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_choice": doc_to_choice,
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    atomic_write_text(out / f"{name}.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return name
