"""Interop with lm-evaluation-harness: lm-eval's evaluator, run with the ``lmstack`` model type on a local
multiple-choice task, reports the same accuracy as ``lmstack eval`` on the same task and model.
(lm-eval's ``hf`` backend on the same directory is compared in benchmarks/eval.py.)"""

from __future__ import annotations

import pytest

from tests.eval_fixtures import make_model_dir, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_lm_eval_with_lmstack_model_equals_lmstack_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lmstack.eval import harness
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
    # the registered model type through lm-eval's own evaluator (``python -m lmstack.eval.harness`` runs lm-eval's
    # CLI around the same call; its built-in task index alone takes ~40 s, so the test skips that part)
    import lm_eval
    from lm_eval.tasks import TaskManager

    assert harness.LmstackLM is lm_eval.api.registry.get_model("lmstack")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    res = lm_eval.simple_evaluate(model="lmstack", model_args=f"pretrained={d}", tasks=list(names.values()),
                                  task_manager=tm, batch_size=8, device="cuda:0", verbosity="ERROR")["results"]
    for spec, name in names.items():
        assert res[name]["acc,none"] == pytest.approx(ours[spec]["metrics"]["acc"]), spec
        assert res[name]["acc_norm,none"] == pytest.approx(ours[spec]["metrics"]["acc_norm"]), spec
    assert ours["mc_en"]["n"] == 10
