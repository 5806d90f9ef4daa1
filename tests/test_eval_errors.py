"""Bad input: unknown task, missing file or field, malformed lines, invalid YAML -- clear one-line errors; the
CLI (run, compare, tasks) end to end."""

from __future__ import annotations

import json

import pytest

from lmstack.cli import main
from lmstack.errors import ConfigError, DataError
from lmstack.eval.report import compare_markdown, compare_runs
from lmstack.eval.run import run_eval
from lmstack.eval.task import load_task
from tests.eval_fixtures import make_model_dir, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("eval_err_model"))


def _yaml(path, **fields):
    import yaml

    path.write_text(yaml.safe_dump(fields), encoding="utf-8")
    return path


def test_unknown_task_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"unknown task 'mmlu_pro'; shipped tasks: .*mc_en.*path to a task YAML"):
        load_task("mmlu_pro")
    with pytest.raises(ConfigError, match=r"task file .*nope\.yaml not found"):
        load_task("nope.yaml")


def test_missing_data_file_names_the_task_and_file_before_loading_the_model(tmp_path):
    y = _yaml(tmp_path / "t.yaml", type="multiple_choice", data="missing.jsonl")
    with pytest.raises(DataError, match=r"task t \(.*t\.yaml\): data file .*missing\.jsonl not found"):
        run_eval(tmp_path / "no_model_needed", [y])


def test_missing_field_names_task_file_and_line(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q1", "choices": ["a", "b"], "answer": "A"}) + "\n"
                    + json.dumps({"question": "q2", "choices": ["a", "b"]}) + "\n")
    y = _yaml(tmp_path / "mine.yaml", type="multiple_choice", data="d.jsonl", choices_field="choices")
    with pytest.raises(DataError, match=r"task mine: .*d\.jsonl:2: missing field 'answer' \(fields present: "
                                        r"question, choices\)"):
        run_eval(model_dir, [y], show_progress=False)


def test_bad_answer_and_template_variable_name_the_line(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "E"}) + "\n")
    y = _yaml(tmp_path / "t.yaml", type="multiple_choice", data="d.jsonl", choices_field="choices")
    with pytest.raises(DataError, match=r"d\.jsonl:1: answer 'E' is neither a letter A-B"):
        run_eval(model_dir, [y], show_progress=False)
    g = _yaml(tmp_path / "g.yaml", type="generation", data="d.jsonl", prompt="Q: {{ quest }}", reference_field="answer")
    with pytest.raises(DataError, match=r"task g: .*d\.jsonl:1: prompt template uses a field the record lacks "
                                        r"\('quest' is undefined\)"):
        run_eval(model_dir, [g], show_progress=False)


def test_malformed_lines_are_counted_and_reported_not_fatal(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1})
    data.write_text(good + "\n{not json\n[1, 2]\n" + good + "\n")
    y = _yaml(tmp_path / "t.yaml", type="multiple_choice", data="d.jsonl", choices_field="choices")
    out = tmp_path / "run"
    r = run_eval(model_dir, [y], out, show_progress=False)["tasks"]["t"]
    assert r["n"] == 2 and r["skipped"] == 2
    assert r["skipped_examples"][0].endswith("d.jsonl:2: invalid JSON (Expecting property name enclosed in "
                                             "double quotes)")
    assert "1 skipped" not in (out / "report.md").read_text() and "t: 2 skipped" in (out / "report.md").read_text()


def test_invalid_task_yaml_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"t\.yaml: invalid task: field stirde: Extra inputs are not permitted"):
        load_task(_yaml(tmp_path / "t.yaml", type="perplexity", data="x.txt", stirde=3))
    with pytest.raises(ConfigError, match=r"type 'ppl' is not a task type; use one of perplexity"):
        load_task(_yaml(tmp_path / "t.yaml", type="ppl", data="x.txt"))
    with pytest.raises(ConfigError, match=r"field stride: must be in \(0, max_length=16\]"):
        load_task(_yaml(tmp_path / "t.yaml", type="perplexity", data="x.txt", max_length=16, stride=32))
    with pytest.raises(ConfigError, match=r"pass@10 needs 1 <= k <= n_samples \(2\)"):
        load_task(_yaml(tmp_path / "t.yaml", type="code", data="x.jsonl", n_samples=2, k=[1, 10]))
    with pytest.raises(ConfigError, match=r"t\.yaml:2: invalid YAML"):
        (tmp_path / "t.yaml").write_text("type: code\n  data: [\n")
        load_task(tmp_path / "t.yaml")


def test_compare_reports_deltas_with_direction():
    def run(acc, ppl, sha="x"):
        return {"model": {"path": "/m"}, "tasks": {
            "mc": {"type": "multiple_choice", "metrics": {"acc": acc}, "n": 10, "data_sha256": sha},
            "p": {"type": "perplexity", "metrics": {"perplexity": ppl}, "n": 1, "data_sha256": "y"}}}

    c = compare_runs(run(0.5, 20.0), run(0.6, 25.0, sha="z"))
    rows = {(r["task"], r["metric"]): r for r in c["rows"]}
    assert rows[("mc", "acc")]["delta"] == pytest.approx(0.1) and rows[("mc", "acc")]["verdict"] == "better"
    assert rows[("p", "perplexity")]["delta"] == pytest.approx(5.0)
    assert rows[("p", "perplexity")]["verdict"] == "worse"  # higher perplexity is worse
    assert c["data_mismatch"] == ["mc"]
    assert "| mc | acc | 0.5000 | 0.6000 | +0.1000 | better |" in compare_markdown(c)


def test_cli_eval_compare_and_errors(model_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", "--model", str(model_dir), "--tasks", "mc_en,ppl_en", "--out", str(a), "--limit", "2"]) == 0
    assert main(["eval", "--model", str(model_dir), "--tasks", "mc_en", "--out", str(b), "--limit", "3"]) == 0
    assert (a / "results.json").is_file() and (a / "report.html").is_file()
    capsys.readouterr()
    assert main(["eval", "compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "mc_en" in out and "only in A: ppl_en" in out and "different numbers of examples" in out
    assert main(["eval", "--model", str(model_dir), "--tasks", "mc_en,nope"]) == 2
    assert "lmstack: unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "compare", str(a), str(tmp_path / "zzz")]) == 2
    assert "no results.json found" in capsys.readouterr().err
    assert main(["eval", "tasks"]) == 0
    assert "code_mini" in capsys.readouterr().out


def test_jsonl_choices_list_is_found_without_configuration(tmp_path):
    from lmstack.eval.choice import mc_requests

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4", "5"], "answer": "4"}) + "\n"
                    + json.dumps({"question": "1+2?", "choices": ["3", "4", "5"], "answer": 0}) + "\n")
    items, pairs, _ = mc_requests(load_task({"type": "multiple_choice", "name": "t", "data": str(data)}))
    assert [it["gold"] for it in items] == [1, 0]
    assert pairs[0] == ("2+2?\nA. 3\nB. 4\nC. 5\nAnswer:", " A") and len(pairs) == 6
    data.write_text(json.dumps({"question": "q", "A": "x", "B": "y"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'C'"):
        mc_requests(load_task({"type": "multiple_choice", "name": "t", "data": str(data)}))


def test_task_prompt_template_runs_in_the_sandbox(model_dir, tmp_path):
    """A task YAML is untrusted: its prompt template cannot walk to Python internals."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    g = _yaml(tmp_path / "g.yaml", type="generation", data="d.jsonl", reference_field="answer",
              prompt="{{ question.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(DataError, match="refused by the sandbox"):
        run_eval(model_dir, [g], show_progress=False)
