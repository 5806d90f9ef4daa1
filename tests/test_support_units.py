"""`rag.context: units`: prompts that show the top answer units of the retrieved passages, ranked without the
model -- an FAQ entry whole, one product fact, one policy sentence -- in training chats (every answer's unit
shown and cited by its number), held-out questions (the ranker's list as it is), the assistant and the HTTP
middleware."""

from __future__ import annotations

import random

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
