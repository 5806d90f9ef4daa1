"""Fine-tuning data: formats, bad-row reports, exact multi-turn loss masks, packing, preference masks."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import DataError
from lmstack.model import load_model
from lmstack.tune.batches import IGNORE, SFTBatches, collate_sft, pack_rows
from lmstack.tune.data import BadRecord, load_pairs, load_sft, to_messages, to_preference
from lmstack.tune.losses import forward_logits
from tests.tune_fixtures import SFT_ROWS, make_model_dir, write_jsonl

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def mdir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tune_data_model"))


@pytest.fixture(scope="module")
def tok(mdir):
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.from_dir(mdir)


def test_formats_become_the_same_messages():
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"},
            {"role": "assistant", "content": "Hello."}]
    assert to_messages({"instruction": "Hi", "input": "there", "output": "Hello.", "system": "Be brief."}) == want
    assert to_messages({"messages": want}) == want
    assert to_messages({"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi\n\nthere"}, {"from": "gpt", "value": "Hello."}]}) == want
    prompt, chosen, rejected = to_preference({"chosen": want, "rejected": want[:2] + [
        {"role": "assistant", "content": "Go away."}]})
    assert prompt == want[:2] and chosen == want[2:] and rejected[0]["content"] == "Go away."
    for bad, why in [({"messages": []}, "non-empty"), ({"instruction": "x"}, "output"),
                     ({"messages": [{"role": "robot", "content": "x"}]}, "robot"),
                     ({"messages": [{"role": "user", "content": "x"}]}, "no assistant"),
                     ({"text": "x"}, "unknown format"), ([1, 2], "JSON object")]:
        with pytest.raises(BadRecord, match=why):
            to_messages(bad)


def test_bad_rows_are_counted_with_line_numbers(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [SFT_ROWS[0], "{not json", {"instruction": "x"}, "", SFT_ROWS[1]])
    ex, rep = load_sft(p, tok, max_len=256)
    assert len(ex) == 2 and rep.used == 2 and rep.records == 4
    assert [ln for ln, _ in rep.bad] == [2, 3]
    assert "line 2: invalid JSON" in rep.summary() and "line 3" in rep.summary()


def test_file_with_no_usable_row_stops_with_a_clear_message(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl: 0 of 2 records used.*line 1: unknown format"):
        load_sft(p, tok, max_len=256)
    with pytest.raises(DataError, match="not found"):
        load_sft(tmp_path / "missing.jsonl", tok, max_len=256)


def test_multi_turn_loss_mask_matches_transformers_assistant_mask(tmp_path, mdir, tok):
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(mdir)
    msgs = SFT_ROWS[2]["messages"]
    ref = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ex, _ = load_sft(write_jsonl(tmp_path / "c.jsonl", [SFT_ROWS[2]]), tok, max_len=512)
    assert ex[0].input_ids == list(ref["input_ids"])
    assert ex[0].loss_mask == list(ref["assistant_masks"])
    # the masked tokens decode to exactly the two assistant replies with their end markers
    kept = [i for i, m in zip(ex[0].input_ids, ex[0].loss_mask) if m]
    assert tok.decode(kept) == "Bonjour.<|im_end|>Merci.<|im_end|>"
    b = collate_sft(ex, pad_id=tok.pad_token_id)
    assert ((b["labels"] != IGNORE).sum()) == sum(ex[0].loss_mask)


def test_pair_mask_covers_only_the_final_reply(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": "Add two and three."}],
             "chosen": "Five.", "rejected": "Red."}]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows + ["[]"]), tok, max_len=256)
    assert len(pairs) == 1
    c = pairs[0].chosen
    assert tok.decode([i for i, m in zip(c.input_ids, c.loss_mask) if m]) == "Five.<|im_end|>"
    r = pairs[0].rejected
    assert tok.decode([i for i, m in zip(r.input_ids, r.loss_mask) if m]) == "Red.<|im_end|>"


def test_packing_gives_each_example_its_unpacked_logits(tmp_path, mdir, tok):
    ex, _ = load_sft(write_jsonl(tmp_path / "d.jsonl", SFT_ROWS), tok, max_len=256)
    packed = pack_rows(ex, seq_len=256, pad_id=tok.pad_token_id)
    assert packed["input_ids"].shape[0] == 1  # all four fit in one row
    model = load_model(mdir)
    with torch.no_grad():
        lp = forward_logits(model, packed)[0]
        t = 0
        for e in ex:
            n = len(e.input_ids)
            alone = model(torch.tensor([e.input_ids]))[0]
            torch.testing.assert_close(lp[t:t + n], alone, rtol=1e-4, atol=1e-4)
            t += n


def test_batches_resume_exactly(tmp_path, tok):
    ex, _ = load_sft(write_jsonl(tmp_path / "d.jsonl", SFT_ROWS * 2), tok, max_len=256)
    a = SFTBatches(ex, batch_size=3, pad_id=1, seed=7)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    want = [next(a)["input_ids"] for _ in range(4)]
    b = SFTBatches(ex, batch_size=3, pad_id=1, seed=7)
    b.load_state_dict(state)
    got = [next(b)["input_ids"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(want, got))


def test_group_by_length_cuts_padding_and_keeps_the_epoch():
    """group_by_length: every example once per epoch, batches of similar length (less padding than random
    batches of the same examples), a different grouping per epoch, and exact resume."""
    import random

    from lmstack.tune.data import Example

    rng = random.Random(0)
    ex = [Example([5] * n, [1] * n) for n in (rng.randint(8, 400) for _ in range(403))]
    plain = SFTBatches(ex, batch_size=4, pad_id=0, seed=3)
    grouped = SFTBatches(ex, batch_size=4, pad_id=0, seed=3, group_by_length=True)
    steps = len(ex) // 4
    pad = lambda b: int((b["attention_mask"] == 0).sum()) if "attention_mask" in b else int((b["input_ids"] == 0).sum())
    plain_pad = sum(pad(next(plain)) for _ in range(steps))
    seen = [i for _ in range(steps) for i in grouped.order.take(4)]
    assert len(set(seen)) == steps * 4 and set(seen) <= set(range(len(ex)))  # each example at most once
    g2 = SFTBatches(ex, batch_size=4, pad_id=0, seed=3, group_by_length=True)
    grouped_pad = sum(pad(next(g2)) for _ in range(steps))
    assert grouped_pad < 0.25 * plain_pad
    lens = [[len(ex[i].input_ids) for i in g2.order._order[a:a + 4]] for a in range(0, 200, 4)]
    assert sum(max(x) - min(x) for x in lens) < sum(max(x) - min(x) for x in (
        [len(ex[i].input_ids) for i in plain.order._order[a:a + 4]] for a in range(0, 200, 4)))
    g3 = SFTBatches(ex, batch_size=4, pad_id=0, seed=3, group_by_length=True)
    first = list(g3.order._order)
    for _ in range(steps + 2):
        next(g3)  # into the next epoch: another grouping of the same examples
    assert g3.order.epoch == 1 and g3.order._order != first and sorted(g3.order._order) == sorted(first)
    state = g2.state_dict()
    want = [next(g2)["input_ids"] for _ in range(5)]
    h = SFTBatches(ex, batch_size=4, pad_id=0, seed=3, group_by_length=True)
    h.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(want, [next(h)["input_ids"] for _ in range(5)]))
