"""The support desk's stages (``recipes/support-desk.yaml``): ``intents`` trains the intent classifier,
``desk`` builds the order database and measures the desk on held-out multi-turn dialogues."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lmstack.pipeline import StageContext
from lmstack.utils.io import atomic_write_json, write_jsonl


def orders_path(ctx_or_cfg: Any) -> Path:
    from lmstack.apps.support.orders import SHIPPED_ORDERS

    return Path(ctx_or_cfg.orders) if getattr(ctx_or_cfg, "orders", None) else SHIPPED_ORDERS


def read_orders(path: Path) -> list[dict[str, Any]]:
    from lmstack.errors import DataError
    from lmstack.utils.io import check_size, iter_jsonl

    check_size(path, 16 << 20)
    rows = list(iter_jsonl(path))
    need = ("order_id", "email", "sku", "product", "product_zh", "status", "eta")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or any(not isinstance(r.get(k), str) for k in need):
            raise DataError(f"{path}:{i}: an order needs string fields {', '.join(need)}")
    return rows


def run_intents(ctx: StageContext) -> dict[str, Any]:
    import torch

    from lmstack.apps.support.desk_data import intent_utterances
    from lmstack.apps.support.kb import load_kb
    from lmstack.model.classify import ClassifyConfig, train_classifier

    c = ctx.config
    torch.set_num_threads(c.threads)
    desk_cfg = _desk_cfg(ctx)
    rows = intent_utterances(read_orders(orders_path(desk_cfg)), load_kb().products, seed=ctx.recipe.seed,
                             per_template=c.per_template)
    out = ctx.out_dir
    write_jsonl(out / "intents.jsonl", rows)
    m = train_classifier(ClassifyConfig(data=str(out / "intents.jsonl"), out=str(out / "model"), epochs=c.epochs,
                                        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                        vocab_size=c.vocab_size, max_length=c.max_length, seed=ctx.recipe.seed))
    ctx.log(f"held-out accuracy {m.get('accuracy')}, macro-F1 {m.get('macro_f1')}")
    return {k: v for k, v in m.items() if k != "labels"}


def _desk_cfg(ctx: StageContext) -> Any:
    from lmstack.apps.support.stages import section

    return section(ctx.recipe, "desk")


def evaluate_desk(make_desk: Any, dialogues: list[dict[str, Any]]) -> dict[str, Any]:
    """Run every dialogue on a fresh desk (``make_desk()`` -> a Desk over a fresh copy of the database) and
    score: intent accuracy (first turn), slot accuracy, task success, escalation precision / recall, answer
    correctness (status and product answers hold the right fact). Returns metrics and the transcripts."""
    from lmstack.apps.support.desk import STATUS_ZH

    n_int = ok_int = n_slot = ok_slot = n_task = ok_task = n_ans = ok_ans = 0
    tp = fp = fn = 0
    model_args: list[bool] = []
    runs = []
    by_scn: dict[str, list[bool]] = {}
    for d in dialogues:
        desk = make_desk()
        replies = [desk.turn(t) for t in d["turns"]]
        st = desk.state
        model_args += st.model_args
        if d["intent"] is not None:
            n_int += 1
            ok_int += bool(st.intents) and st.intents[0][0] == d["intent"]
        for k, v in d["slots"].items():
            n_slot += 1
            ok_slot += st.slots.get(k) == v
        esc = st.escalated is not None
        tp += esc and d["escalate"]
        fp += esc and not d["escalate"]
        fn += (not esc) and d["escalate"]
        e, last = d["expect"], replies[-1]["text"]
        if d["scenario"].startswith("status"):
            o = desk.db.order(e["order_id"])
            word = STATUS_ZH[e["status"]] if d["lang"] == "zh" else e["status"]
            answer_ok = word in last and e["order_id"] in last and o["eta"] in last
            n_ans += 1
            ok_ans += answer_ok
            success = answer_ok and not esc
        elif d["scenario"].startswith("cancel"):
            success = desk.db.order(e["order_id"])["status"] == e["final_status"] and not esc
        elif d["scenario"] == "product":
            answer_ok = e["fact"] in last
            n_ans += 1
            ok_ans += answer_ok
            success = answer_ok and not esc
        else:
            success = esc and st.ticket is not None and len(desk.db.tickets()) == 1
        n_task += 1
        ok_task += bool(success)
        by_scn.setdefault(d["scenario"], []).append(bool(success))
        runs.append({"scenario": d["scenario"], "lang": d["lang"], "success": bool(success),
                     "escalated": st.escalated, "turns": [{"user": t, "desk": r["text"]}
                                                          for t, r in zip(d["turns"], replies)]})
        desk.db.close()

    def r(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {"dialogues": len(dialogues), "intent_accuracy": r(ok_int, n_int), "slot_accuracy": r(ok_slot, n_slot),
            "task_success": r(ok_task, n_task), "escalation_precision": r(tp, tp + fp),
            "escalation_recall": r(tp, tp + fn), "answer_correctness": r(ok_ans, n_ans),
            "task_success_by_scenario": {k: r(sum(v), len(v)) for k, v in sorted(by_scn.items())},
            # with a model writing the order tools' arguments (desk.tool_model_url): how often they equal the slots
            "model_tool_calls": len(model_args), "model_tool_args_accuracy": r(sum(model_args), len(model_args))}, runs


def run_desk(ctx: StageContext) -> dict[str, Any]:
    import tempfile

    from lmstack.apps.support.desk import Desk
    from lmstack.apps.support.desk_data import dialogues
    from lmstack.apps.support.kb import load_kb
    from lmstack.apps.support.orders import OrderDB
    from lmstack.model.classify import Classifier

    c, out = ctx.config, ctx.out_dir
    orders = read_orders(orders_path(c))
    products = load_kb().products
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    OrderDB.create(out / "orders.sqlite", orders).close()
    shutil.copytree(ctx.stage_dir("intents") / "model", out / "intents")
    atomic_write_json(out / "settings.json", {"min_confidence": c.min_confidence, "guard": c.guard})
    clf = Classifier(out / "intents")
    from lmstack.apps.support.desk import desk_guard

    guard = desk_guard(c.guard) if c.guard else None
    dl = dialogues(orders, products, n_per=c.dialogues_per_scenario, seed=ctx.recipe.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        caller = None
        if c.tool_model_url:
            from lmstack.apps.support.desk import ApiToolCaller

            caller = ApiToolCaller(c.tool_model_url, c.tool_model)

        def make() -> Desk:
            p = Path(tmp) / "orders.sqlite"
            shutil.copyfile(out / "orders.sqlite", p)
            return Desk(clf, OrderDB(p), products, guard, c.min_confidence, tool_caller=caller)

        m, runs = evaluate_desk(make, dl)
    write_jsonl(out / "transcripts.jsonl", runs)
    intents = ctx.summaries.get("intents") or {}
    m["intent_classifier"] = {k: intents.get(k) for k in ("accuracy", "macro_f1", "accuracy_en", "accuracy_zh",
                                                          "macro_f1_en", "macro_f1_zh", "eval_records")}
    atomic_write_json(out / "metrics.json", m)
    ctx.log(f"task success {m['task_success']}, escalation P/R {m['escalation_precision']}/{m['escalation_recall']}")
    return m
