"""Interop with lm-evaluation-harness: lm-eval's CLI, run with the ``lmstack`` model type on a local
multiple-choice task, reports the same accuracy as ``lmstack eval`` on the same task and model.
(lm-eval's ``hf`` backend on the same directory is compared in benchmarks/eval.py.)"""

from __future__ import annotations

import json
import sys

import pytest

from tests.eval_fixtures import make_model_dir, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_lm_eval_cli_with_lmstack_model_equals_lmstack_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lmstack.cli import lm_eval as harness
    from lmstack.eval.lmeval_task import export_lm_eval_task
    from lmstack.eval.run import run_eval
    from lmstack.eval.task import load_task

    d = make_model_dir(tmp_path / "model", seed=3)
    names = {}
    for spec in ("mc_en", "mc_en_text"):  # letter scoring (acc) and option-text scoring (acc_norm differs)
        t = load_task(spec)
        t.limit = 10
        names[spec] = export_lm_eval_task(t, tmp_path / "tasks")
    ours = run_eval(d, ["mc_en", "mc_en_text"], limit=10, show_progress=False)["tasks"]
    # exactly what `python -m lmstack.eval.harness ...` runs: lm-eval's own CLI with the model type registered
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lm_eval.tasks.TaskManager)  # --local_tasks_only patches it
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for lm-eval's parser
    assert harness.LmstackLM is lm_eval.api.registry.get_model("lmstack")
    harness.main(["--model", "lmstack", "--model_args", f"pretrained={d}", "--include_path", str(tmp_path / "tasks"),
                  "--tasks", ",".join(names.values()), "--output_path", str(tmp_path / "out"), "--batch_size", "8",
                  "--local_tasks_only"])
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())["results"]
    for spec, name in names.items():
        assert res[name]["acc,none"] == pytest.approx(ours[spec]["metrics"]["acc"]), spec
        assert res[name]["acc_norm,none"] == pytest.approx(ours[spec]["metrics"]["acc_norm"]), spec
    assert ours["mc_en"]["n"] == 10


def test_harness_rolling_loglikelihood_and_generation(tmp_path):
    import torch
    import transformers
    from lm_eval.api.instance import Instance

    from lmstack.cli.lm_eval import LmstackLM  # the harness model with the serving engine attached

    d = make_model_dir(tmp_path / "model")
    text = "The river town woke slowly in the grey light of early spring."
    lm = LmstackLM(pretrained=str(d), device="cuda:0")  # lm-eval's default device falls back to cpu
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([[1] + transformers.AutoTokenizer.from_pretrained(d)(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0, :-1], -1)
    assert total == pytest.approx(float(logp.gather(1, ids[0, 1:, None]).sum()), rel=1e-5)
    req = Instance("generate_until", {}, ("Question: hi\nAnswer:", {"until": ["\n"], "max_gen_toks": 6}), 0)
    (out,) = lm.generate_until([req], disable_tqdm=True)
    assert out == lm.lm.generate(["Question: hi\nAnswer:"], max_tokens=6, stop=["\n"])[0][0]
