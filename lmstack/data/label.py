"""Annotation: Label Studio JSON and a plain JSON Lines schema, pre-labels, uncertainty routing, merge, agreement.

Record (the plain JSONL schema, one object a line; Label Studio tasks convert to it and back without loss)::

    {"id": 7, "data": {"text": "...", ...},
     "annotations": [{"annotator": 3, "label": "refund"}, ...],       # people
     "predictions": [{"model": "clf-v1", "label": "refund", "score": 0.91}],
     "label": "refund"}                                               # after merge: the majority label

Label Studio (https://labelstud.io/guide/task_format): a task is ``{"id", "data", "annotations", "predictions"}``;
an annotation's ``result`` holds one ``{"from_name", "to_name", "type": "choices", "value": {"choices": [L]}}``
item per control; ``completed_by`` is the annotator. Keys lmstack does not interpret are kept in ``extra`` /
``result_extra`` so an export re-creates the import exactly. tests/test_data_label.py validates what we write
with ``label_studio_sdk.label_interface.LabelInterface``.

Routing is uncertainty sampling (Lewis & Gale 1994): the records whose top prediction has the lowest probability
(least confidence) or the smallest top-two margin go to people first. Agreement: Cohen's kappa for two annotators
(Cohen 1960), Fleiss' kappa for several raters per item (Fleiss 1971).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmstack.errors import ConfigError, DataError

MAX_FILE_BYTES = 256 << 20
FROM_NAME, TO_NAME = "label", "text"
_TASK_KEYS = {"id", "data", "annotations", "predictions"}


# ---------------------------------------------------------------------------------------------- formats
def _choice(result: Any, from_name: str) -> tuple[str | None, dict[str, Any] | None]:
    """The single choice of a ``choices`` result list and the item's other keys; (None, None) when it is not one
    single-choice item for ``from_name``."""
    if not isinstance(result, list) or len(result) != 1 or not isinstance(result[0], dict):
        return None, None
    item = result[0]
    v = item.get("value")
    if (item.get("type") != "choices" or item.get("from_name") != from_name or not isinstance(v, dict)
            or set(v) != {"choices"} or not isinstance(v["choices"], list) or len(v["choices"]) != 1
            or not isinstance(v["choices"][0], str)):
        return None, None
    return v["choices"][0], {k: x for k, x in item.items() if k not in ("type", "from_name", "value")}


def from_label_studio(tasks: Any, from_name: str = FROM_NAME, where: str = "tasks") -> list[dict[str, Any]]:
    """Label Studio tasks (a list of task objects) -> records."""
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise DataError(f"{where}: expected a JSON list of Label Studio tasks")
    out = []
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
            raise DataError(f"{where}: task {i} has no \"data\" object")
        rec: dict[str, Any] = {"id": t.get("id", i), "data": t["data"], "annotations": [], "predictions": []}
        for kind, who in (("annotations", "completed_by"), ("predictions", "model_version")):
            items = t.get(kind) or []
            if not isinstance(items, list):
                raise DataError(f"{where}: task {i} \"{kind}\" is not a list")
            for a in items:
                if not isinstance(a, dict):
                    raise DataError(f"{where}: task {i} has a {kind[:-1]} that is not an object")
                label, rest = _choice(a.get("result"), from_name)
                r: dict[str, Any] = {"annotator" if kind == "annotations" else "model": a.get(who), "label": label}
                if kind == "predictions" and "score" in a:
                    r["score"] = a["score"]
                extra = {k: v for k, v in a.items() if k not in (who, "score" if kind == "predictions" else "", "result")}
                if label is None:
                    extra["result"] = a.get("result")  # not a single choice: kept verbatim
                elif rest:
                    r["result_extra"] = rest
                if extra:
                    r["extra"] = extra
                rec[kind].append(r)
        extra = {k: v for k, v in t.items() if k not in _TASK_KEYS}
        if "annotations" not in t:
            extra["_no_annotations_key"] = True
        if "predictions" not in t:
            extra["_no_predictions_key"] = True
        if extra:
            rec["extra"] = extra
        out.append(rec)
    return out


def to_label_studio(records: Sequence[dict[str, Any]], from_name: str = FROM_NAME, to_name: str = TO_NAME
                    ) -> list[dict[str, Any]]:
    """Records -> Label Studio tasks (the inverse of :func:`from_label_studio`)."""
    tasks = []
    for rec in records:
        extra = dict(rec.get("extra") or {})
        no_ann, no_pred = extra.pop("_no_annotations_key", False), extra.pop("_no_predictions_key", False)
        t: dict[str, Any] = {"id": rec["id"], "data": rec["data"]}
        for kind, who, name in (("annotations", "completed_by", "annotator"), ("predictions", "model_version", "model")):
            if (no_ann if kind == "annotations" else no_pred) and not rec.get(kind):
                continue
            items = []
            for a in rec.get(kind) or []:
                x = dict(a.get("extra") or {})
                if a.get("label") is not None:
                    x["result"] = [{**(a.get("result_extra") or {}), "from_name": from_name,
                                    "to_name": (a.get("result_extra") or {}).get("to_name", to_name),
                                    "type": "choices", "value": {"choices": [a["label"]]}}]
                x.setdefault("result", [])
                x[who] = a.get(name)
                if "score" in a:
                    x["score"] = a["score"]
                items.append(x)
            t[kind] = items
        t.update(extra)
        tasks.append(t)
    return tasks


def _check_size(p: Path) -> None:
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{p}: {p.stat().st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit")


def read_records(path: str | Path, text_field: str = "text", from_name: str = FROM_NAME) -> list[dict[str, Any]]:
    """A Label Studio export (``.json``: a list of tasks) or JSON Lines: records, or plain ``{"text": ...}`` lines
    (each becomes ``{"id": line number, "data": {...the line...}}``)."""
    from lmstack.utils.io import iter_jsonl_lines

    p = Path(path)
    _check_size(p)
    if p.suffix == ".json":
        try:
            tasks = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        recs = from_label_studio(tasks, from_name, str(p))
    else:
        def bad(lineno: int, reason: str) -> None:
            raise DataError(f"{p}:{lineno}: {reason}")

        recs = []
        for lineno, r in iter_jsonl_lines(p, bad):
            if not isinstance(r, dict):
                bad(lineno, "expected a JSON object")
            if isinstance(r.get("data"), dict):
                recs.append({"annotations": [], "predictions": [], **r, "id": r.get("id", lineno)})
            elif isinstance(r.get(text_field), str):
                rec = {"id": r.get("id", lineno), "data": {k: v for k, v in r.items() if k != "id"},
                       "annotations": [], "predictions": []}
                recs.append(rec)
            else:
                bad(lineno, f'expected a record with "data" or a string "{text_field}"')
    ids = Counter(str(r["id"]) for r in recs)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise DataError(f"{p}: task id {dup[0]} occurs {ids[dup[0]]} times; ids must be unique")
    return recs


def write_records(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``.json`` -> Label Studio tasks; anything else -> the JSONL schema."""
    from lmstack.utils.io import atomic_write_json, write_jsonl

    p = Path(path)
    if p.suffix == ".json":
        atomic_write_json(p, to_label_studio(records))
    else:
        write_jsonl(p, records)
    return p


# ---------------------------------------------------------------------------------------------- pre-label, route
def text_of(rec: dict[str, Any], text_field: str = "text") -> str:
    t = rec["data"].get(text_field)
    if not isinstance(t, str):
        raise DataError(f"task {rec['id']}: data has no string {text_field!r}")
    return t


def add_prediction(rec: dict[str, Any], model: str, probs: dict[str, float]) -> dict[str, Any]:
    """Set ``model``'s prediction on ``rec`` from its label probabilities: the top label with score = its
    probability, ``label_probs`` (all of them), and ``uncertainty``: least confidence ``1 - p_max`` and
    ``margin`` ``p_1 - p_2``. A previous prediction of the same model is replaced."""
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    pmax = ranked[0][1]
    margin = pmax - (ranked[1][1] if len(ranked) > 1 else 0.0)
    rec["predictions"] = [x for x in rec.get("predictions") or [] if x.get("model") != model]
    rec["predictions"].append({"model": model, "label": ranked[0][0], "score": round(pmax, 4)})
    rec["label_probs"] = {k: round(v, 6) for k, v in probs.items()}
    rec["uncertainty"] = {"least_confidence": round(1 - pmax, 4), "margin": round(margin, 4)}
    return rec


def prelabel(records: list[dict[str, Any]], model_dir: str | Path, text_field: str = "text",
             model_name: str | None = None) -> list[dict[str, Any]]:
    """Add a prediction (label, score = its probability) from a trained classifier to every record, plus
    ``uncertainty``: least confidence ``1 - p_max`` and ``margin`` ``p_1 - p_2``."""
    from lmstack.model.classify import Classifier

    clf = Classifier(model_dir)
    probs = clf.probabilities([text_of(r, text_field) for r in records])
    names = clf.model.config.id2label
    name = model_name or Path(model_dir).name
    for rec, p in zip(records, probs):
        add_prediction(rec, name, {names[i]: float(x) for i, x in enumerate(p)})
    return records


def route(records: list[dict[str, Any]], k: int, strategy: str = "least_confidence",
          skip_annotated: bool = True) -> list[dict[str, Any]]:
    """The ``k`` records to send to people first: most uncertain under ``strategy`` (least_confidence: highest
    ``1 - p_max``; margin: smallest top-two margin); ties keep file order."""
    if strategy not in ("least_confidence", "margin"):
        raise ConfigError(f"routing strategy {strategy!r}; choose least_confidence or margin")
    pool = [r for r in records if "uncertainty" in r and not (skip_annotated and r.get("annotations"))]
    if len(pool) < sum(1 for r in records if not (skip_annotated and r.get("annotations"))):
        raise DataError("some records have no prediction: run `lmstack data label predict` first")
    key = (lambda r: -r["uncertainty"]["least_confidence"]) if strategy == "least_confidence" else \
        (lambda r: r["uncertainty"]["margin"])
    return sorted(pool, key=key)[:max(0, k)]


def merge(records: list[dict[str, Any]], human: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Add the annotations of ``human`` records (matched by id) to ``records`` (an annotator's second label for
    the same task replaces the first) and set each record's ``label`` to the majority of its annotations (ties:
    the label whose first vote came earliest). Returns counts."""
    by_id = {str(r["id"]): r for r in records}
    added = unknown = 0
    for h in human:
        rec = by_id.get(str(h["id"]))
        if rec is None:
            unknown += 1
            continue
        for a in h.get("annotations") or []:
            if a.get("label") is None:
                continue
            rec["annotations"] = [x for x in rec.get("annotations") or [] if x.get("annotator") != a.get("annotator")
                                  or a.get("annotator") is None] + [a]
            added += 1
    labelled = 0
    for rec in records:
        votes = [a["label"] for a in rec.get("annotations") or [] if a.get("label") is not None]
        if votes:
            c = Counter(votes)
            best = max(c.values())
            rec["label"] = next(v for v in votes if c[v] == best)
            labelled += 1
    return {"annotations_added": added, "unknown_ids": unknown, "labelled_records": labelled,
            "records": len(records)}


# ---------------------------------------------------------------------------------------------- agreement
def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """(p_o - p_e) / (1 - p_e) for two raters over the same items; 1.0 when both always use one same label."""
    if len(a) != len(b) or not a:
        raise DataError("Cohen's kappa needs two equally long, non-empty label lists")
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from an items x categories count table (each row sums to the same number of raters n >= 2):
    P_i = (sum_j n_ij^2 - n) / (n (n - 1)), P_bar = mean P_i, p_j = sum_i n_ij / (N n), P_e = sum p_j^2."""
    rows = [list(map(int, r)) for r in table]
    if not rows:
        raise DataError("Fleiss' kappa needs at least one item")
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows):
        raise DataError("Fleiss' kappa needs the same number (>= 2) of ratings for every item")
    N = len(rows)
    p_bar = sum((sum(x * x for x in r) - n) / (n * (n - 1)) for r in rows) / N
    pj = [sum(r[j] for r in rows) / (N * n) for j in range(len(rows[0]))]
    pe = sum(p * p for p in pj)
    return 1.0 if pe == 1 else (p_bar - pe) / (1 - pe)


def agreement(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Inter-annotator agreement over records with two or more annotations: Cohen's kappa for every annotator
    pair (on the items both labelled) and their mean; Fleiss' kappa over the items with the most common number
    of raters."""
    multi = [r for r in records if len([a for a in r.get("annotations") or [] if a.get("label") is not None]) >= 2]
    res: dict[str, Any] = {"items_with_2plus_annotations": len(multi)}
    if not multi:
        return res
    per: dict[str, dict[str, str]] = defaultdict(dict)
    for r in multi:
        for a in r["annotations"]:
            if a.get("label") is not None:
                per[str(a.get("annotator"))][str(r["id"])] = a["label"]
    names = sorted(per)
    pairs = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            common = sorted(set(per[x]) & set(per[y]))
            if len(common) >= 2:
                pairs[f"{x}|{y}"] = {"items": len(common), "cohen_kappa": round(
                    cohen_kappa([per[x][c] for c in common], [per[y][c] for c in common]), 4)}
    res["annotators"] = names
    res["cohen_pairs"] = pairs
    if pairs:
        res["cohen_kappa_mean"] = round(sum(p["cohen_kappa"] for p in pairs.values()) / len(pairs), 4)
    counts = Counter(len([a for a in r["annotations"] if a.get("label") is not None]) for r in multi)
    n = counts.most_common(1)[0][0]
    rows = [r for r in multi if len([a for a in r["annotations"] if a.get("label") is not None]) == n]
    cats = sorted({a["label"] for r in rows for a in r["annotations"] if a.get("label") is not None})
    table = [[sum(a.get("label") == c for a in r["annotations"]) for c in cats] for r in rows]
    res["fleiss"] = {"items": len(rows), "raters_per_item": n, "kappa": round(fleiss_kappa(table), 4)}
    return res
