"""``run_eval``: evaluate one model (optionally with an adapter) on a list of tasks and write the run.

Output directory::

    OUT/results.json        metrics per task + provenance (model path, weights / tokenizer / data sha256,
                            lmstack version, task config, timings)
    OUT/samples/TASK.jsonl  per-example predictions, references and scores
    OUT/report.md, OUT/report.html   tables and a plot (lmstack.eval.report)

Every task YAML and data file is validated before the model is loaded, so a typo fails in a second.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

from lmstack.errors import DataError
from lmstack.eval.task import load_task
from lmstack.utils.io import atomic_write, atomic_write_json, file_sha256
from lmstack.utils.progress import progress as make_progress

RESULTS_VERSION = 1


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the weights: of ``model.safetensors``, or of the sorted per-shard hashes when sharded."""
    from lmstack.model.hf_io import weight_files

    files = weight_files(Path(model_dir))
    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def data_sha256(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(f"{f.relative_to(p)}:{file_sha256(f)}\n".encode())
        return h.hexdigest()
    return file_sha256(p)


def _evaluator(task_type: str):
    if task_type == "perplexity":
        from lmstack.eval.perplexity import evaluate_perplexity as f
    elif task_type == "multiple_choice":
        from lmstack.eval.choice import evaluate_multiple_choice as f
    elif task_type == "classification":
        from lmstack.eval.choice import evaluate_classification as f
    elif task_type == "generation":
        from lmstack.eval.generation import evaluate_generation as f
    elif task_type == "tool_calls":
        from lmstack.eval.toolcalls import evaluate_tool_calls as f
    else:
        from lmstack.eval.code import evaluate_code as f
    return f


def run_eval(model_dir: str | Path, tasks: Sequence[str | Path | dict], out_dir: str | Path | None = None, *,
             adapter: str | Path | None = None, limit: int | None = None, device: str | None = None,
             dtype: str | None = None, batch_tokens: int = 8192, lm=None, engine=None,
             show_progress: bool | None = None, write_report: bool = True,
             syntax_constrained: bool | None = None, repair_rounds: int | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``tasks`` (shipped names, YAML paths or dicts); return the results dict.

    ``limit`` caps the examples per task. ``syntax_constrained`` (when not None) sets the code tasks' option of
    that name (decode under the Python-syntax guard); ``repair_rounds`` their repair loop's rounds. ``lm`` reuses an already loaded :class:`~lmstack.eval.lm.EvalLM`.
    ``engine`` decodes the generation tasks (``lmstack.serve.evaluation.generate``; the callers above the
    serving layer pass it in).
    When ``out_dir`` is given, results.json, samples/ and the reports are written there (atomically).
    """
    from lmstack._version import __version__
    from lmstack.eval.lm import EvalLM

    loaded = [load_task(t) for t in tasks]
    names = [t.name for t in loaded]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"task name {sorted(dup)[0]!r} appears twice; give each task a distinct name")
    for t in loaded:
        if limit is not None:
            t.limit = min(t.limit, limit) if t.limit else limit
        if syntax_constrained is not None and t.type == "code":
            t.syntax_constrained = syntax_constrained
        if repair_rounds is not None and t.type == "code":
            t.repair_rounds = repair_rounds
        for p in [t.data] + ([t.fewshot_data] if getattr(t, "fewshot_data", None) else []):
            if not Path(p).exists():
                raise DataError(f"task {t.name} ({t.source}): data file {p} not found "
                                "(paths in a task YAML are relative to the YAML file)")
    clf = _encoder_classifier(model_dir, loaded, adapter) if lm is None else None
    if clf is not None:
        return _run_classifier(clf, model_dir, loaded, out_dir, limit, show_progress, write_report)
    if lm is None:
        lm = EvalLM.load(model_dir, adapter=adapter, device=device, dtype=dtype, batch_tokens=batch_tokens)
    if engine is not None:
        lm.engine = engine
    results: dict[str, Any] = {
        "format_version": RESULTS_VERSION,
        "lmstack_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(Path(model_dir).resolve()), "weights_sha256": weights_sha256(model_dir),
                  "tokenizer_sha256": lm.tok.sha256, "model_type": lm.model.config.model_type,
                  "parameters": lm.model.num_parameters(), "dtype": str(lm.model.dtype).removeprefix("torch."),
                  "device": str(lm.device)},
        "adapter": None if adapter is None else {"path": str(Path(adapter).resolve()),
                                                 "sha256": data_sha256(adapter)},
        "limit": limit,
        "tasks": {},
    }
    samples: dict[str, list] = {}
    with make_progress(disable=None if show_progress is None else not show_progress) as prog:
        for t in loaded:
            t0 = time.perf_counter()
            r = _evaluator(t.type)(lm, t, prog)
            samples[t.name] = r.pop("samples", [])
            data_hash = data_sha256(t.data)
            results["tasks"][t.name] = {
                "type": t.type, "source": t.source, "data": t.data, "data_sha256": data_hash,
                **r, "seconds": round(time.perf_counter() - t0, 3),
                "config": t.model_dump(mode="json"),
            }
    if out_dir is not None:
        write_run(results, samples, out_dir, write_report=write_report)
    return results


def _encoder_classifier(model_dir: str | Path, tasks: list, adapter):
    """A :class:`~lmstack.model.classify.Classifier` when ``model_dir`` is a BERT sequence classifier, else None.
    Such a model runs classification tasks only: any other task is refused before work."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        conf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # EvalLM.load reports it
    if not isinstance(conf, dict) or conf.get("model_type") != "bert":
        return None
    arch = (conf.get("architectures") or ["BertModel"])[0]
    if arch != "BertForSequenceClassification":
        raise DataError(f"{model_dir} is a {arch}; `lmstack eval` runs a BertForSequenceClassification (classification "
                        "tasks) or a causal language model")
    other = [t for t in tasks if t.type != "classification"]
    if other:
        raise DataError(f"task {other[0].name} ({other[0].type}) needs a causal language model; {model_dir} is an "
                        "encoder classifier, which runs classification tasks only")
    if adapter is not None:
        raise DataError("--adapter applies to causal language models; an encoder classifier takes none")
    from lmstack.model.classify import Classifier

    return Classifier(model_dir)


def _run_classifier(clf, model_dir, loaded, out_dir, limit, show_progress, write_report) -> dict[str, Any]:
    from lmstack._version import __version__
    from lmstack.eval.choice import evaluate_with_classifier

    m = clf.model
    results: dict[str, Any] = {
        "format_version": RESULTS_VERSION, "lmstack_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(Path(model_dir).resolve()), "weights_sha256": weights_sha256(model_dir),
                  "tokenizer_sha256": clf.tok.sha256, "model_type": "bert",
                  "architecture": "BertForSequenceClassification",
                  "parameters": sum(p.numel() for p in m.parameters()), "dtype": "float32", "device": "cpu"},
        "adapter": None, "limit": limit, "tasks": {},
    }
    samples: dict[str, list] = {}
    for t in loaded:
        t0 = time.perf_counter()
        r = evaluate_with_classifier(clf, t)
        samples[t.name] = r.pop("samples", [])
        results["tasks"][t.name] = {"type": t.type, "source": t.source, "data": t.data,
                                    "data_sha256": data_sha256(t.data), **r,
                                    "seconds": round(time.perf_counter() - t0, 3), "config": t.model_dump(mode="json")}
    if out_dir is not None:
        write_run(results, samples, out_dir, write_report=write_report)
    return results


def write_run(results: dict, samples: dict[str, list], out_dir: str | Path, write_report: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in samples.items():
        with atomic_write(out / "samples" / f"{name}.jsonl") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_json(out / "results.json", results)
    if write_report:
        from lmstack.eval.report import write_reports

        write_reports(results, out)
    return out
