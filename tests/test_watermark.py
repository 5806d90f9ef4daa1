"""The generation watermark end to end: 200 watermarked tokens from lmstack's engine give z > 4 and the same
request unwatermarked z < 2; detection equals the paper's formula over green lists recomputed here by hand
(SHA-256 seeding, any context width); per-request `extra_body={"watermark": ...}` and the server-wide setting
(`lmstack serve --watermark-key`) on a live server, detected by `lmstack watermark detect --model DIR TEXT|FILE`."""

from __future__ import annotations

import hashlib
import json
import math

import openai
import pytest
import torch

from lmstack.guard.watermark import detect, watermark_factory
from tests.serve_fixtures import LiveServer, shared_model_dir

torch.set_num_threads(2)


def _hand_green(context: list[int], V: int, gamma: float, key: int) -> set[int]:
    """lmstack's green list, recomputed from its definition: seed = first 8 bytes (little-endian, top bit
    cleared) of SHA-256("key:t1,...,th"), a torch.randperm of the vocabulary, the first int(gamma V) ids."""
    h = hashlib.sha256(f"{key}:{','.join(map(str, context))}".encode()).digest()
    seed = int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    return set(perm[:int(gamma * V)].tolist())


@pytest.mark.parametrize("width", [1, 2, 3])
def test_detection_equals_the_formula_by_hand(width):
    V, gamma, key = 50, 0.3, 987654321
    ids = [int(x) for x in torch.randint(0, V, (60,), generator=torch.Generator().manual_seed(width)).tolist()]
    green = sum(ids[i] in _hand_green(ids[i - width:i], V, gamma, key) for i in range(width, len(ids)))
    T = len(ids) - width
    z = (green - gamma * T) / math.sqrt(T * gamma * (1 - gamma))
    d = detect(ids, V, gamma=gamma, key=key, context_width=width, z_threshold=4)
    assert (d.green, d.scored) == (green, T)
    assert d.z == pytest.approx(z, abs=1e-4) and d.p_value == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))


@pytest.fixture(scope="module")
def llm():
    import lmstack.serve.llm as L

    return L.load(shared_model_dir(), max_num_seqs=4)


@pytest.mark.parametrize("width", [1, 3])
def test_200_engine_tokens_marked_z_over_4_unmarked_under_2(llm, width):
    V = llm.model.config.vocab_size
    prompt = llm.tokenizer.encode("where is my order")
    kw = dict(temperature=1.0, seed=7, max_tokens=200, ignore_eos=True)
    fac = watermark_factory(V, gamma=0.25, delta=2.0, key=4242, context_width=width)
    marked = llm.generate([prompt], logits_processors=[fac], **kw)[0].outputs[0].token_ids
    plain = llm.generate([prompt], **kw)[0].outputs[0].token_ids
    assert len(marked) == len(plain) == 200
    # the engine seeds the first tokens with the prompt's tail: give the detector the full sequence
    full_m, full_p = prompt + list(marked), prompt + list(plain)
    dm = detect(full_m[len(prompt) - width:], V, key=4242, context_width=width)
    dp = detect(full_p[len(prompt) - width:], V, key=4242, context_width=width)
    assert dm.scored == 200 and dm.z > 4 and dm.watermarked
    assert dp.z < 2 and not dp.watermarked
    assert detect(full_m, V, key=4243, context_width=width).z < 4  # the wrong key finds nothing


@pytest.fixture(scope="module")
def server(llm):
    from lmstack.serve.api.app import create_app

    app = create_app(llm, served_model_name="tiny")
    with LiveServer(app) as s:
        s.app = app
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)
        yield s


@pytest.fixture
def marks(monkeypatch):
    """Every EngineWatermark the server builds (one per sequence), to read the token ids it saw accepted: the
    tiny random model samples byte pieces whose text does not re-tokenize to the same ids, so the test detects
    on the ids the server generated (a trained model's text re-tokenizes; the CLI's TEXT path is tested below)."""
    from lmstack.guard import watermark as W

    made = []
    init = W.EngineWatermark.__init__

    def record(self, processor):
        init(self, processor)
        made.append(self)

    monkeypatch.setattr(W.EngineWatermark, "__init__", record)
    return made


def _complete(server, **extra) -> str:
    r = server.client.completions.create(model="tiny", prompt="where is my order", max_tokens=200, temperature=1.0,
                                         seed=11, extra_body={"ignore_eos": True, **extra})
    return r.choices[0].text


def _z(server, ids, **kw) -> float:
    return detect(ids, server.app.state.model.vocab_size, **kw).z


def test_per_request_watermark_over_http(server, marks):
    marked = _complete(server, watermark={"key": 777, "delta": 2.0, "context_width": 2})
    assert len(marks) == 1 and len(marks[0].tokens) == 200
    p = marks[0].processor
    assert (p.key, p.delta, p.gamma, p.context_width, p.vocab_size) == (777, 2.0, 0.25, 2, 320)
    tok = server.app.state.model.tokenizer
    assert tok.decode(marks[0].tokens, skip_special_tokens=True) == marked  # the ids behind the answer
    assert _z(server, marks[0].tokens, key=777, context_width=2) > 4
    assert _z(server, marks[0].tokens, key=778, context_width=2) < 4
    _complete(server)
    assert len(marks) == 1  # no watermark asked, none on this server: none applied
    # a bad watermark is a 400 naming the field; no key anywhere is a 400 too
    for bad in ({"key": 1, "gamma": 1.5}, {"key": 1, "context_width": 99}, True, {"gamma": 0.5}):
        with pytest.raises(openai.BadRequestError) as e:
            _complete(server, watermark=bad)
        assert e.value.body["param"] == "watermark"


def test_server_wide_watermark(server, marks):
    model = server.app.state.model
    model.watermark = {"key": 31337, "gamma": 0.25, "delta": 2.0, "context_width": 1, "scheme": "lmstack"}
    try:
        _complete(server)  # nothing in the request: the server's key
        _complete(server, watermark={"key": 99})  # a request may pick its own key, not turn it off
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=50, temperature=1.0, seed=3,
                                              extra_body={"ignore_eos": True})  # the chat route too
        with pytest.raises(openai.BadRequestError) as e:
            _complete(server, watermark=False)
        assert "watermarks every answer" in e.value.message
    finally:
        model.watermark = None
    assert [m.processor.key for m in marks] == [31337, 99, 31337]
    assert _z(server, marks[0].tokens, key=31337) > 4 and _z(server, marks[1].tokens, key=99) > 4


def test_cli_detect_text_file_and_ids(llm, capsys, tmp_path):
    """`lmstack watermark detect --model DIR TEXT|FILE` tokenizes the text with the model's tokenizer and
    prints the z-test of those ids; `lmstack guard watermark-detect` is the same command."""
    from lmstack.cli import main

    V = llm.model.config.vocab_size
    text = "Refunds go back to the original card within five business days of the return."
    ids = llm.tokenizer.encode(text)
    want = detect(ids, V, key=5, context_width=2)
    outs = []
    f = tmp_path / "answer.txt"
    f.write_text(text, encoding="utf-8")
    for argv in (["watermark", "detect", "--model", str(shared_model_dir()), text],
                 ["watermark", "detect", "--model", str(shared_model_dir()), str(f)],
                 ["guard", "watermark-detect", "--tokenizer", str(shared_model_dir()), text],
                 ["watermark", "detect", "--ids", ",".join(map(str, ids)), "--vocab-size", str(V)]):
        capsys.readouterr()
        assert main(argv + ["--key", "5", "--context-width", "2"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    for o in outs:
        assert (o["z"], o["green"], o["scored"]) == (want.z, want.green, want.scored)
        assert o["p_value"] == want.p_value == pytest.approx(0.5 * math.erfc(want.z / math.sqrt(2)), abs=1e-4)


def test_cli_bad_input_is_one_line(capsys, tmp_path):
    from lmstack.cli import main

    assert main(["watermark", "detect", "hello"]) == 2  # no --model
    assert main(["watermark", "detect", "--model", str(tmp_path / "nope"), "hello"]) == 2
    assert main(["watermark", "detect", "--ids", "1,2,3", "--vocab-size", "10", "--scheme", "nope"]) == 2
    assert main(["serve", "--model", str(tmp_path / "nope"), "--watermark-key", "5", "--watermark-scheme", "x"]) == 2
    assert "Traceback" not in capsys.readouterr().err
