"""Pipeline runner semantics (fake stages: skip, invalidate downstream, --from, --only, resume, lock) and the
shipped support data (held-out questions never seen in training, determinism, bad-input messages)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from lmstack.config import StrictModel
from lmstack.errors import ConfigError, DataError, LmstackError
from lmstack.pipeline.recipe import Recipe, load_recipe
from lmstack.pipeline.runner import Stage, StageInterrupted, run_stages

REPO = Path(__file__).resolve().parents[1]


class FakeConfig(StrictModel):
    """A stage section of the fake app: any keys (typed configs are the real stages' business)."""

    model_config = {"extra": "allow"}


# ------------------------------------------------------------------------------------------ fake stages
def _registry(calls: list[tuple[str, bool]], fail: dict[str, BaseException] | None = None) -> dict[str, Stage]:
    """Five stages that record (name, resume) and write one output file each."""
    fail = fail if fail is not None else {}

    def make(name: str, deps: list[str]) -> Stage:
        def run(ctx):
            calls.append((name, ctx.resume))
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            (ctx.out_dir / "partial").write_text("x")
            if name in fail:
                raise fail.pop(name)
            (ctx.out_dir / "out.txt").write_text(name)
            return {"upstream": sorted(ctx.summaries), "value": ctx.config.model_dump(mode="json")}

        def outputs(ctx):  # reads its config, as the real finetune stage does (its run_dir): --plan must pass it
            assert ctx.config is not None
            return [ctx.out_dir / "out.txt"]

        return Stage(name, run, deps=lambda r, d=deps: [x for x in d if x in r.stages], config=FakeConfig,
                     outputs=outputs)

    return {"data": make("data", []), "tokenizer": make("tokenizer", ["data"]),
            "pretrain": make("pretrain", ["tokenizer"]), "finetune": make("finetune", ["data", "pretrain"]),
            "eval": make("eval", ["finetune"])}


FIVE = ["data", "tokenizer", "pretrain", "finetune", "eval"]  # the fake registry's stages (no rag)


def _recipe(tmp_path: Path, **kw) -> Recipe:
    return Recipe(name="t", app="fake", run_dir=str(tmp_path / "run"), **{"stages": FIVE, **kw})


def _support(tmp_path: Path, **kw) -> Recipe:
    stages = ["data", "rag", "tokenizer", "pretrain", "finetune", "reader", "eval", "bundle"]
    return Recipe(name="t", app="support", run_dir=str(tmp_path / "run"), **{"stages": stages, **kw})


def test_rag_stage_fingerprints_leave_tokenizer_and_pretraining_alone(tmp_path):
    """The support app's stages: a retrieval setting reruns rag, fine-tuning, the reader, eval and the bundle,
    never tokenizer or pretraining; a reader setting reruns the reader, eval and the bundle only."""
    from lmstack.pipeline import get_app
    from lmstack.pipeline.runner import fingerprints

    stages = get_app("support").registry
    a = fingerprints(_support(tmp_path), stages)
    b = fingerprints(_support(tmp_path, rag={"k": 2}), stages)
    assert [n for n in a if a[n] != b[n]] == ["rag", "finetune", "reader", "eval", "bundle"]
    c = fingerprints(_support(tmp_path, reader={"l2": 0.1}), stages)
    assert [n for n in a if a[n] != c[n]] == ["reader", "eval", "bundle"]
    d = fingerprints(_support(tmp_path, seed=1), stages)
    assert all(a[n] != d[n] for n in a)  # the seed reaches every stage, by the one rule


def test_one_config_rule_for_run_pretrain_and_finetune(tmp_path):
    """`lmstack run`, `lmstack pretrain -c` and `lmstack finetune -c` build the same stage config from one file:
    the recipe's seed/device/dtype are train defaults (a stage's own value wins), run_dir is runs/NAME/STAGE, and
    the app's wiring fills the paths the section leaves unset (an explicit path wins)."""
    from lmstack.pipeline import configure, get_app, stage_config
    from lmstack.train.config import PretrainConfig, load_pretrain_config
    from lmstack.tune.config import FinetuneConfig

    doc = yaml.safe_load((REPO / "recipes" / "scratch.yaml").read_text(encoding="utf-8"))
    doc.update(seed=7, device="cpu", run_dir=str(tmp_path / "run"))
    doc["finetune"]["train"]["seed"] = 3
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    run = configure(load_recipe(path), get_app("support").registry)
    pre = stage_config(PretrainConfig, str(path), "pretrain")
    fin = stage_config(FinetuneConfig, str(path), "finetune")
    assert pre == run["pretrain"] and fin == run["finetune"]
    assert (pre.train.seed, pre.train.device, fin.train.seed, fin.train.device) == (7, "cpu", 3, "cpu")
    assert pre.run_dir == str(tmp_path / "run" / "pretrain") and pre.data.shards == str(tmp_path / "run/tokenizer/shards")
    assert fin.model == str(tmp_path / "run/pretrain/final") and fin.data.path == str(tmp_path / "run/rag/sft_train.jsonl")
    # the lower floor's reader (no app wiring) follows the same rule for everything it can know
    low = load_pretrain_config(str(path), [f"data.shards={pre.data.shards}"])
    assert low == pre
    # an explicit path in the section wins over the wiring
    assert stage_config(FinetuneConfig, str(path), "finetune", ["data.path=x.jsonl"]).data.path == "x.jsonl"
    # the old shape gets one clear line
    doc["finetune"] = {"method": "full", "config": {"train": {"steps": 3}}}
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match="move the keys under finetune.config up one level"):
        stage_config(FinetuneConfig, str(path), "finetune")


def test_runs_then_skips_then_reruns_only_what_changed(tmp_path):
    calls: list = []
    reg = _registry(calls)
    res = run_stages(_recipe(tmp_path), reg)
    assert [c[0] for c in calls] == ["data", "tokenizer", "pretrain", "finetune", "eval"]
    assert [s.status for s in res.stages] == ["ran"] * 5
    assert res.summary("finetune")["upstream"] == ["data", "pretrain", "tokenizer"]
    state = json.loads((tmp_path / "run/state/pretrain.json").read_text())
    assert state["status"] == "done" and len(state["fingerprint"]) == 64

    calls.clear()
    res = run_stages(_recipe(tmp_path), reg)
    assert calls == [] and [s.status for s in res.stages] == ["skipped"] * 5
    assert res.summary("eval")["upstream"] == ["data", "finetune", "pretrain", "tokenizer"]  # reused summaries

    # a pretrain config change reruns pretrain and everything downstream of it, not data/tokenizer
    calls.clear()
    changed = _recipe(tmp_path, pretrain={"train": {"steps": 7}})
    res = run_stages(changed, reg)
    assert [c[0] for c in calls] == ["pretrain", "finetune", "eval"]
    assert res.summary("pretrain")["value"]["train"] == {"steps": 7, "seed": 0, "device": "auto", "dtype": "auto"}

    # a missing output makes a stage rerun even with the same fingerprint
    calls.clear()
    (tmp_path / "run/tokenizer/out.txt").unlink()
    run_stages(changed, reg)
    assert [c[0] for c in calls] == ["tokenizer"]


def test_from_and_only(tmp_path):
    calls: list = []
    reg = _registry(calls)
    recipe = _recipe(tmp_path)
    with pytest.raises(LmstackError, match="has not completed"):
        run_stages(recipe, reg, only="pretrain")  # nothing done yet
    run_stages(recipe, reg)
    calls.clear()
    run_stages(recipe, reg, from_stage="finetune")
    assert [c[0] for c in calls] == ["finetune", "eval"]
    calls.clear()
    res = run_stages(recipe, reg, only="tokenizer")
    assert [c[0] for c in calls] == ["tokenizer"]
    assert [(s.name, s.status) for s in res.stages] == [("data", "skipped"), ("tokenizer", "ran")]
    with pytest.raises(ConfigError, match="not a stage of this recipe"):
        run_stages(recipe, reg, from_stage="quantize")
    with pytest.raises(ConfigError, match="either --from or --only"):
        run_stages(recipe, reg, from_stage="data", only="eval")


def test_interrupted_stage_resumes_and_failed_stage_is_not_marked_done(tmp_path):
    calls: list = []
    reg = _registry(calls, fail={"pretrain": KeyboardInterrupt()})
    recipe = _recipe(tmp_path)
    with pytest.raises(StageInterrupted, match="run the same command again to resume"):
        run_stages(recipe, reg)
    assert json.loads((tmp_path / "run/state/pretrain.json").read_text())["status"] == "running"
    assert not (tmp_path / "run/state/finetune.json").exists()
    calls.clear()
    res = run_stages(recipe, reg)
    # finished stages skipped; the interrupted one reruns with resume=True and keeps its partial output
    assert calls == [("pretrain", True), ("finetune", False), ("eval", False)]
    assert [s.status for s in res.stages] == ["skipped", "skipped", "resumed", "ran", "ran"]

    # an interrupted stage whose config then changed starts over (resume=False, directory cleared)
    reg = _registry(calls, fail={"finetune": RuntimeError("boom")})
    with pytest.raises(RuntimeError):
        run_stages(_recipe(tmp_path, finetune={"method": "full"}), reg)
    calls.clear()
    run_stages(_recipe(tmp_path, finetune={"method": "lora"}), reg)
    assert calls[0] == ("finetune", False)


def test_sigterm_in_a_stage_exits_143_and_the_stage_resumes(tmp_path):
    """SIGTERM (lmstack.errors.Terminated, raised by the CLI's handler) stops a stage like Ctrl-C does, with
    exit status 143 and the stage left to resume."""
    from lmstack.errors import Terminated

    calls: list = []
    with pytest.raises(StageInterrupted, match="terminated during stage tokenizer") as e:
        run_stages(_recipe(tmp_path), _registry(calls, fail={"tokenizer": Terminated()}))
    assert e.value.exit_code == 143
    assert json.loads((tmp_path / "run/state/tokenizer.json").read_text())["status"] == "running"
    with pytest.raises(StageInterrupted) as e:
        run_stages(_recipe(tmp_path), _registry(calls, fail={"pretrain": KeyboardInterrupt()}))
    assert e.value.exit_code == 130


def test_run_dir_lock(tmp_path):
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(LmstackError, match="in use by another lmstack run"):
        run_stages(recipe, _registry([]))
    (run / ".lock").write_text("999999999")  # stale: no such process
    run_stages(recipe, _registry([]))
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------- recipes
def test_recipe_validation_errors(tmp_path):
    from lmstack.pipeline import recipe_app

    p = tmp_path / "r.yaml"

    def check(doc, *overrides):
        p.write_text(yaml.safe_dump(doc))
        return recipe_app(load_recipe(p, list(overrides)))

    with pytest.raises(ConfigError, match="must follow the order"):
        check({"name": "x", "app": "support", "stages": ["tokenizer", "data"]})
    with pytest.raises(ConfigError, match="pretrain.trian"):
        check({"name": "x", "app": "support", "stages": ["data", "tokenizer", "pretrain"], "pretrain": {"trian": {}}})
    with pytest.raises(ConfigError, match="need a base model"):
        check({"name": "x", "app": "support", "stages": ["data", "finetune"]})
    with pytest.raises(ConfigError, match=r"r.yaml: invalid config: eval.max_tokens"):
        check({"name": "x", "app": "support", "stages": ["data"]}, "eval.max_tokens=0")
    with pytest.raises(ConfigError, match="'evel' is neither a recipe field nor a stage"):
        check({"name": "x", "app": "support", "stages": ["data"], "evel": {}})
    with pytest.raises(ConfigError, match="app 'nope' is not installed; installed apps: .*support"):
        check({"name": "x", "app": "nope", "stages": ["data"]})
    with pytest.raises(ConfigError, match="names its app"):
        load_recipe(p, ["app=null"])


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_shipped_recipes_are_found():
    assert len(SHIPPED) >= 10 and (REPO / "recipes" / "quickstart.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_validate(path, tmp_path):
    """Every shipped recipe parses; a recipe with stages passes its app's checks and every section validates
    against its stage's own config; a stage-only recipe validates as the config of the command it names."""
    from lmstack.config import read_yaml
    from lmstack.pipeline import recipe_app, stage_config
    from lmstack.train.config import PretrainConfig
    from lmstack.tune.config import DistillConfig, DPOConfig, FinetuneConfig

    recipe = load_recipe(path)
    if recipe.model is not None:  # real-checkpoint recipes: point at a stand-in directory
        (tmp_path / "config.json").write_text("{}")
        recipe.model = str(tmp_path)
    if recipe.stages:
        recipe_app(recipe)
    else:
        kinds = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "dpo": DPOConfig, "distill": DistillConfig}
        sections = [k for k in read_yaml(path) if k in kinds]
        assert sections, f"{path.name}: a stage-only recipe configures one of {sorted(kinds)}"
        for k in sections:
            stage_config(kinds[k], str(path), k)


# ------------------------------------------------------------------------------------------ support data
def test_knowledge_base_and_heldout_split_never_leak():
    from lmstack.apps.support import build_support_data, kb_documents, load_kb, qa_items

    kb = load_kb()
    assert 40 <= len(kb.faqs) <= 80 and len(kb.products) == 30
    assert {"shipping", "returns", "warranty", "payment"} <= set(kb.policies)
    assert all(set(v) == {"en", "zh"} for v in kb.policies.values())
    data = build_support_data(kb, seed=3)
    train_user = {m["content"] for r in data["train"] for m in r["messages"] if m["role"] == "user"}
    pages = "\n".join(d["text"] for d in kb_documents(kb))
    held = data["heldout"]
    assert len(held) == len(qa_items(kb)) == 2 * len(kb.faqs) + 2 * 5 * len(kb.products)
    for row in held:
        assert row["question"] not in train_user, row["question"]
        assert row["question"] not in pages, row["question"]
        assert row["messages"][-1] == {"role": "user", "content": row["question"]}
    assert {r["lang"] for r in held} == {"en", "zh"}
    # dev questions: one more paraphrase per FAQ entry and a greeting / out-of-scope question per language,
    # none of them in training, the pages or the held-out set; their answers are taught in training
    dev = data["dev"]
    assert len(dev) == 2 * len(kb.faqs) + 4
    assert {r["id"] for r in dev if r["id"].startswith("reply/")} == {
        f"reply/{k}.{lang}" for k in ("greeting", "out-of-scope") for lang in ("en", "zh")}
    held_q = {r["question"] for r in held}
    for row in dev:
        assert row["question"] not in train_user and row["question"] not in pages and row["question"] not in held_q
        assert row["messages"][-1] == {"role": "user", "content": row["question"]}
    assert any(re.search(r"[\u4e00-\u9fff]", q) for q in train_user)
    # held-out greetings and out-of-scope questions (task support_reply): in neither training, dev nor the pages
    reply = data["reply"]
    assert len(reply) >= 16 and {r["lang"] for r in reply} == {"en", "zh"}
    assert {r["topic"] for r in reply} == {"greeting", "out-of-scope"}
    dev_q = {r["question"] for r in dev}
    for row in reply:
        assert row["question"] not in train_user | dev_q | held_q and row["question"] not in pages, row["question"]
    # general knowledge is the general check's (asked without the shop's prompt), never a trained refusal
    from lmstack.apps.support.stages import general_qa_path
    from lmstack.config import read_yaml

    general = {x["q"] for lang in ("en", "zh") for x in read_yaml(general_qa_path())[lang]}
    assert len(general) == 40 and not general & (train_user | dev_q | {r["question"] for r in reply})
    # every held-out fact is taught in training under other wordings
    answers = {m["content"] for r in data["train"] for m in r["messages"] if m["role"] == "assistant"}
    assert all(r["answer"] in answers for r in held + dev + reply)
    # deterministic per seed, different across seeds
    assert build_support_data(kb, seed=3) == data
    assert build_support_data(kb, seed=4)["train"] != data["train"]


def test_sample_heldout_is_balanced_and_deterministic():
    from lmstack.apps.support import build_support_data, load_kb, sample_heldout

    rows = build_support_data(load_kb())["heldout"]
    a = sample_heldout(rows, 40, seed=1)
    assert a == sample_heldout(rows, 40, seed=1) and len(a) == 40 and len({r["id"] for r in a}) == 40
    kinds = {(r["lang"], r["topic"].startswith("product")) for r in a}
    assert kinds == {("en", True), ("en", False), ("zh", True), ("zh", False)}
    assert sample_heldout(rows, None) == rows


def test_malformed_knowledge_base_names_file_and_entry(tmp_path):
    import shutil

    from lmstack.apps.support import default_kb_dir, load_kb

    kb = tmp_path / "shop"
    shutil.copytree(default_kb_dir(), kb)
    faq = yaml.safe_load((kb / "faq.yaml").read_text(encoding="utf-8"))
    faq[2]["zh"]["q"] = ["only one"]
    (kb / "faq.yaml").write_text(yaml.safe_dump(faq, allow_unicode=True), encoding="utf-8")
    with pytest.raises(DataError, match=r"faq\.yaml: entry 3 \(ship-express\): field zh\.q"):
        load_kb(kb)
    shutil.copy(default_kb_dir() / "faq.yaml", kb / "faq.yaml")
    prods = yaml.safe_load((kb / "products.yaml").read_text(encoding="utf-8"))
    prods[4]["price"] = "cheap"
    (kb / "products.yaml").write_text(yaml.safe_dump(prods, allow_unicode=True), encoding="utf-8")
    with pytest.raises(DataError, match=r"products\.yaml: entry 5 \(LH-K05\): field 'price'"):
        load_kb(kb)
    (kb / "products.yaml").write_text("- [unclosed\n")
    with pytest.raises(DataError, match=r"products\.yaml:\d+: invalid YAML"):
        load_kb(kb)


def test_stdlib_corpus_cap_kinds_and_determinism():
    from lmstack.data.stdlib_corpus import stdlib_corpus

    a = stdlib_corpus(150_000)
    total = sum(len(d["text"]) for d in a)
    assert 120_000 < total <= 150_000
    assert {d["kind"] for d in a} == {"topic", "docstring", "code"}
    assert all(d["license"] == "PSF-2.0" for d in a)
    assert not any("/test/" in d["source"] or "test_" in d["source"].rsplit("/", 1)[-1] for d in a)
    assert stdlib_corpus(150_000) == a


def test_plan_matches_what_run_does(tmp_path):
    from lmstack.pipeline.runner import plan_stages

    calls: list = []
    reg = _registry(calls, fail={"finetune": KeyboardInterrupt()})
    recipe = _recipe(tmp_path)
    assert [a for _, a, _ in plan_stages(recipe, reg)] == ["run"] * 5
    with pytest.raises(StageInterrupted):
        run_stages(recipe, reg)
    plan = plan_stages(_recipe(tmp_path, eval={"max_tokens": 3}), reg)
    assert [(n, a) for n, a, _ in plan] == [("data", "skip"), ("tokenizer", "skip"), ("pretrain", "skip"),
                                           ("finetune", "resume"), ("eval", "run")]
    calls.clear()
    res = run_stages(_recipe(tmp_path, eval={"max_tokens": 3}), reg)
    assert [s.status for s in res.stages] == ["skipped", "skipped", "skipped", "resumed", "ran"]
    assert [a for _, a, _ in plan_stages(recipe, reg, from_stage="pretrain")] == ["skip", "skip", "run", "run", "run"]
    assert plan_stages(recipe, reg, only="data") == [("data", "run", "--only")]


def test_micro_preset_matches_transformers_parameter_count():
    """The scratch recipe's model: transformers' Llama of the same shape has the same parameters (3,934,656)."""
    import transformers

    from lmstack.model import build_model
    from lmstack.model.config import preset

    cfg = preset("micro")
    ours = build_model(cfg, device="cpu")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, tie_word_embeddings=cfg.tie_word_embeddings))
    assert ours.num_parameters() == hf.num_parameters() == 3_934_656


def test_apps_are_found_by_entry_point_or_by_name_in_a_source_tree(monkeypatch):
    """`lmstack run` finds an app through the lmstack.apps entry points (pip install), and in a source tree run
    without an install through lmstack.apps.NAME.pipeline; an unknown name lists what is installed."""
    import lmstack.pipeline.app as A

    app = A.get_app("support")
    assert app.name == "support" and "bundle" in app.order
    monkeypatch.setattr(A, "_APPS", {})
    monkeypatch.setattr(A, "entry_points", lambda group: [])  # as if lmstack were not pip-installed
    assert A.get_app("support").order == app.order
    with pytest.raises(ConfigError, match="app 'risk' is not installed; installed apps: support"):
        A.get_app("risk")


def test_general_qa_file_is_read_strictly(tmp_path):
    """The general check's YAML: a bare answer string is one answer (not its characters); a malformed entry is
    one clear error naming the file and the entry."""
    from lmstack.apps.support.stages import general_qa_path, read_general_qa
    from lmstack.errors import DataError

    rows = read_general_qa(general_qa_path())
    assert len(rows) == 40 and {r["lang"] for r in rows} == {"en", "zh"}
    assert rows[0]["messages"] == [{"role": "user", "content": rows[0]["question"]}]  # no system prompt
    f = tmp_path / "g.yaml"
    f.write_text("en:\n  - {q: 'Capital of France?', a: Paris}\n  - {q: 'Days in a week?', a: [7, seven]}\n",
                 encoding="utf-8")
    assert [r["answer"] for r in read_general_qa(f)] == [["Paris"], ["7", "seven"]]
    f.write_text("en:\n  - {q: 'Capital of France?'}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"g.yaml: en\[0\]: expected \{q: question, a: answer or \[answers\]\}"):
        read_general_qa(f)
    f.write_text("- just a list\n", encoding="utf-8")
    with pytest.raises(Exception, match="g.yaml"):
        read_general_qa(f)
