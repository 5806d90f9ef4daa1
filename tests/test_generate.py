"""Text generation end to end on a model directory with a trained tokenizer: text equals transformers'
greedy output decoded by `tokenizers`, streaming, stop strings, chat template, and the CLI verbs."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from lmstack.cli import main
from lmstack.serve.llm import load
from lmstack.serve.terminal import chat_loop
from tests.engine_fixtures import hf_greedy, text_model_dir

torch.set_num_threads(2)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tdir(tmp_path_factory):
    path, model = text_model_dir(tmp_path_factory.mktemp("textm"))
    hf_tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    return path, model, hf_tok


@pytest.fixture(scope="module")
def llm(tdir):
    return load(tdir[0], device="cpu")


def _reference(tdir, prompt_ids, n):
    _, model, hf_tok = tdir
    ids = hf_greedy(model, prompt_ids, n)
    return ids, hf_tok.decode(ids, skip_special_tokens=True)


def test_text_and_stream_match_transformers(tdir, llm):
    hf_tok = tdir[2]
    prompt_ids = hf_tok.encode(PROMPT, add_special_tokens=True).ids
    ids, text = _reference(tdir, prompt_ids, 24)
    out = llm.generate(PROMPT, temperature=0, max_new_tokens=24, ignore_eos=True)[0]
    assert out.prompt_token_ids == prompt_ids and out.prompt == PROMPT
    assert out.outputs[0].token_ids == ids
    assert out.outputs[0].text == text
    deltas = list(llm.stream(PROMPT, temperature=0, max_new_tokens=24, ignore_eos=True))
    assert "".join(deltas) == text and len(deltas) > 1


def test_stop_string_cut_and_never_streamed(tdir, llm):
    hf_tok = tdir[2]
    prompt_ids = hf_tok.encode(PROMPT, add_special_tokens=True).ids
    _, text = _reference(tdir, prompt_ids, 24)
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    assert len(stop) == 3
    want = text[:text.index(stop)]
    deltas, final = [], None
    for o in llm.stream_outputs(PROMPT, temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop]):
        deltas.append(o.outputs[0].delta_text)
        final = o
    c = final.outputs[0]
    assert c.text == want and "".join(deltas) == want
    assert c.finish_reason == "stop" and c.stop_reason == stop
    inc = llm.generate(PROMPT, temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop],
                       include_stop_str_in_output=True)[0].outputs[0]
    assert inc.text == want + stop


def test_chat_uses_the_template_and_reset(tdir, llm):
    import transformers

    path, model, hf_tok = tdir
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    turns = iter(["hello there", "/reset", "tell me", "/exit"])
    written: list[str] = []
    conv = chat_loop(llm, lambda _: next(turns), written.append, temperature=0, max_tokens=10, ignore_eos=True)
    assert [m["role"] for m in conv] == ["user", "assistant"]  # /reset dropped the first exchange
    ids = ref_tok.apply_chat_template([{"role": "user", "content": "tell me"}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    want = hf_tok.decode(hf_greedy(model, list(ids), 10), skip_special_tokens=True)
    assert conv[1]["content"] == want
    assert want in "".join(written) and "(conversation cleared)" in "".join(written)
    one = llm.chat([{"role": "user", "content": "tell me"}], temperature=0, max_tokens=10, ignore_eos=True)
    assert one.outputs[0].text == want


def test_cli_generate_and_chat(tdir, capsys, monkeypatch):
    path, model, hf_tok = tdir
    prompt_ids = hf_tok.encode(PROMPT, add_special_tokens=True).ids
    rc = main(["generate", "--model", str(path), "--prompt", PROMPT, "--temperature", "0",
               "--max-new-tokens", "8", "--seed", "1"])
    assert rc == 0
    ids = hf_greedy(model, prompt_ids, 8)
    eos = hf_tok.token_to_id("<|im_end|>")
    if eos in ids:  # the CLI stops at EOS
        ids = ids[:ids.index(eos)]
    assert capsys.readouterr().out == hf_tok.decode(ids, skip_special_tokens=True) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert "/reset" in capsys.readouterr().out
    assert main(["generate", "--model", str(path / "nope"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith("lmstack: ")
