"""`rag.context: units`: prompts that show the top answer units of the retrieved passages, ranked without the
model -- an FAQ entry whole, one product fact, one policy sentence -- in training chats (every answer's unit
shown and cited by its number), held-out questions (the ranker's list as it is), the assistant and the HTTP
middleware."""

from __future__ import annotations

import json
import random
import shutil
from types import SimpleNamespace

import pytest

from lmstack.apps.support import SYSTEM_PROMPT, build_support_data
from lmstack.apps.support.reader import Reader, answer_units, ground_units, unit_hits
from lmstack.apps.support.retrieval import (CITATION, citation_numbers, context_hits, ground_chat,
                                            ground_question, states)
from lmstack.rag import HEADER
from lmstack.rag.rerank import LinearRanker

OVERLAP = LinearRanker({"overlap": 1.0, "rank2": -0.01, "rank3": -0.02, "rank_more": -0.03})


@pytest.fixture(scope="module")
def reader():
    return Reader(None, OVERLAP)


def test_unit_hits_are_ranked_answer_units(retriever, reader):
    hits = context_hits(retriever, "What does the Cedar Cutting Board weigh?", k=3)
    units = unit_hits(reader, "What does the Cedar Cutting Board weigh?", hits, 4)
    assert [u.rank for u in units] == [1, 2, 3, 4]
    assert units[0].chunk.text == "The Cedar Cutting Board weighs 1.2 kg."  # the unit sharing the most terms
    every = {u for h in hits for u in answer_units(h.chunk)}
    for u in units:
        src = retriever.get(u.chunk.id)
        if u.chunk.id.startswith("faq/"):
            assert u.chunk.text == src.text.strip() and u.chunk.text.startswith("Q: ")  # the FAQ entry whole
        else:
            assert u.chunk.text in every and u.chunk.text != src.text  # one sentence, not the passage
    assert [u.score for u in units] == sorted((u.score for u in units), reverse=True)
    # the fixed greeting / refusal are answers, never context; fewer units than asked when fewer exist
    assert all("Larkspur Home support assistant" not in u.chunk.text for u in units)
    one = [retriever.get("faq/ship-free.en")]
    from lmstack.rag import Hit

    assert [u.chunk.text for u in unit_hits(reader, "Is shipping free?", [Hit(one[0], 1.0, 1)], 4)] == [one[0].text.strip()]


def test_training_chats_show_and_cite_every_answer_unit(kb, retriever, reader):
    data = build_support_data(kb, seed=0, n_dialogues=20)
    rng = random.Random(0)
    rows = [ground_chat(r, retriever, k=3, rng=rng, cite=True) for r in data["train"][:300]]
    firsts = []
    for src, rec in zip(data["train"][:300], rows):
        g = ground_units(rec, reader, retriever, 4, SYSTEM_PROMPT, cite=True)
        assert [m["role"] for m in g["messages"]] == [m["role"] for m in rec["messages"]]
        units = g["units"]
        if not src["facts"]:  # greetings and refusals: nothing to show, nothing cited
            assert all(not CITATION.search(m["content"]) for m in g["messages"] if m["role"] == "assistant")
            continue
        assert 1 <= len(units) <= 4 and g["messages"][0]["content"].startswith(SYSTEM_PROMPT + "\n\n" + HEADER)
        answers = [m["content"] for m in src["messages"] if m["role"] == "assistant"]
        cited = [m["content"] for m in g["messages"] if m["role"] == "assistant"]
        for a, c in zip(answers, cited):
            assert c.startswith(a)
            nums = citation_numbers(c)
            assert len(nums) == 1 and states(units[nums[0] - 1], a), (c, units)  # the number of ITS unit
            assert f"[{nums[0]}] {units[nums[0] - 1]}" in g["messages"][0]["content"]
        firsts.append(units[0] == answers[-1] or states(units[0], answers[-1]))
    # the ranker's order, not the gold first: the model learns from the lists it will read
    assert 0.3 < sum(firsts) / len(firsts) < 0.95


def test_heldout_questions_get_the_rankers_list_as_is(kb, retriever, reader):
    data = build_support_data(kb, seed=0, n_dialogues=0)
    for row in data["heldout"][::9]:
        q = ground_question(row, retriever, k=3)
        g = ground_units(q, reader, retriever, 3, SYSTEM_PROMPT)
        hits = [retriever.get(c) for c in q["context"]]
        from lmstack.rag import Hit

        want = unit_hits(reader, row["question"], [Hit(c, 0.0, i + 1) for i, c in enumerate(hits)], 3)
        assert g["units"] == [u.chunk.text for u in want]  # nothing added for a question: no gold is known
        assert g["messages"][-1] == row["messages"][-1]


def test_assistant_and_middleware_with_unit_context(retriever):
    from lmstack.apps.support.assistant import SupportAssistant
    from lmstack.apps.support.server import ground_messages

    class LLM:
        def __init__(self):
            self.seen = []

        def chat_prompt(self, messages):
            return messages

        def stream(self, messages, **kw):
            self.seen.append(messages)
            yield "The Cedar Cutting Board weighs 1.2 kg. [1]"

    llm = LLM()
    bot = SupportAssistant(llm, index=retriever, k=3, mode="generate", context="units", units=2, ranker=OVERLAP)
    answer = bot.ask("What does the Cedar Cutting Board weigh?")
    assert [h.chunk.text for h in bot.last_context][0] == "The Cedar Cutting Board weighs 1.2 kg."
    assert len(bot.last_context) == 2 and bot.cited(answer) == [bot.last_context[0]]
    system = llm.seen[0][0]["content"]
    assert "[1] The Cedar Cutting Board weighs 1.2 kg.\n[2] " in system and "[3]" not in system
    with pytest.raises(ValueError, match="likelihood"):
        SupportAssistant(llm, index=retriever, mode="generate", context="units", ranker=LinearRanker({"lm": 1.0}))
    with pytest.raises(ValueError, match="context"):
        SupportAssistant(llm, index=retriever, mode="generate", context="sentences")
    msgs = ground_messages([{"role": "user", "content": "What does the Cedar Cutting Board weigh?"}], retriever, k=3,
                           units=(Reader(None, OVERLAP), 2))
    assert msgs[0]["role"] == "system" and "[1] The Cedar Cutting Board weighs 1.2 kg." in msgs[0]["content"]
    assert "[3]" not in msgs[0]["content"]


def test_reader_stage_writes_the_unit_prompts_later_stages_read(kb, retriever, reader, tmp_path):
    """The stage-level path: with rag.context: units the recipe's prompts come from the reader stage's directory,
    its outputs include them, and write_unit_prompts re-grounds the rag stage's files (chats cite their unit)."""
    from lmstack.apps.support import stages as st
    from lmstack.apps.support.pipeline import APP
    from lmstack.errors import ConfigError
    from lmstack.pipeline.recipe import load_recipe
    from lmstack.utils.io import write_jsonl

    quick = "recipes/quickstart.yaml"
    rec = load_recipe(quick, ["rag.context=units", "stages=[data,rag,base,reader,finetune,eval,bundle]",
                              f"run_dir={tmp_path / 'run'}", "eval.heldout_limit=10"])
    APP.validate(rec)
    assert st.units_context(rec) and st.qa_dir(rec) == tmp_path / "run" / "reader"
    assert st.grounded_dir(rec) == tmp_path / "run" / "rag"
    for bad, why in ((["rag.context=units"], "list it before finetune"),
                     (["rag.context=units", "stages=[data,rag,base,finetune,eval,bundle]"], "add the reader stage"),
                     (["stages=[data,rag,base,reader,finetune,eval,bundle]", "reader.features=[lm,overlap]"],
                      "list reader after finetune")):
        with pytest.raises(ConfigError, match=why):
            APP.validate(load_recipe(quick, bad))
    data = build_support_data(kb, seed=0, n_dialogues=4)
    rag = tmp_path / "run" / "rag"
    rag.mkdir(parents=True)
    shutil.copyfile(retriever.path, rag / "index.sqlite")  # the index the rag stage writes there
    write_jsonl(rag / "sft_train.jsonl", (ground_chat(r, retriever, k=3, cite=True) for r in data["train"][:40]))
    write_jsonl(rag / "heldout_qa.jsonl", (ground_question(r, retriever, k=3) for r in data["heldout"]))
    write_jsonl(rag / "dev_qa.jsonl", (ground_question(r, retriever, k=3) for r in data["dev"][:10]))
    out = tmp_path / "run" / "reader"
    out.mkdir()
    asked = st._eval_subset_ids(rec)
    assert len(asked) == 10
    stats = st.write_unit_prompts(rec, out, reader, asked)
    assert sorted(p.name for p in out.iterdir()) == ["dev_qa.jsonl", "heldout_qa.jsonl", "sft_train.jsonl"]
    held = [r for r in map(json.loads, (out / "heldout_qa.jsonl").read_text().splitlines()) if r["id"] in asked]
    shown = sum(any(states(u, r["answer"]) for u in r["units"]) for r in held) / len(held)
    assert stats["units"] == 4 and stats["heldout_answer_shown"] == round(shown, 4)
    assert 0 <= stats["heldout_answer_first"] <= stats["heldout_answer_shown"] <= 1
    chats = list(map(json.loads, (out / "sft_train.jsonl").read_text().splitlines()))
    assert len(chats) == 40 and all(len(c["units"]) <= 4 for c in chats)
    stage = APP.registry["reader"]
    need = {p.name for p in stage.outputs(SimpleNamespace(out_dir=out, recipe=rec))}
    assert need == {"no_model.json", "sft_train.jsonl", "heldout_qa.jsonl", "dev_qa.jsonl"}
