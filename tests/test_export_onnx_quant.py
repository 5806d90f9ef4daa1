"""``lmstack export --format onnx --dtype int4`` (int8 lm_head included): onnxruntime's MatMulNBits graph holds the
weights ``lmstack quantize`` wrote.

Reference: lmstack's quantized model (``load_quantized``), whose eager modules are checked against the format's
formula in tests/test_quant_packed.py, run on the whole sequence without a cache; onnxruntime runs the exported
graph (prefill, then cached one-token steps). One export (~15-40 s on 2 shared cores); the float-model path of
``--dtype int8`` and the real SmolLM2 are in tests/interop_onnx.py (``make test-interop``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.export_fixtures import tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmstack.cli import main

    d = tmp_path_factory.mktemp("onnxq")
    tiny_model_dir("qwen2", d / "model", initializer_range=0.2)  # q/k/v biases, GQA, tied embeddings
    assert main(["quantize", "--model", str(d / "model"), "--method", "int4", "--group-size", "32",
                 "--out", str(d / "q")]) == 0
    assert main(["export", "--model", str(d / "q"), "--format", "onnx", "--dtype", "int4",
                 "--out", str(d / "onnx")]) == 0
    return d


def test_graph_holds_matmulnbits_with_the_stored_weights_and_no_float_copy(setup):
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    d = setup
    g = onnx.load(str(d / "onnx" / "model.onnx")).graph
    nodes = [n for n in g.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    assert sorted((a["bits"], a["block_size"]) for a in attrs) == [(4, 32)] * 14 + [(8, 64)]  # 2 x 7 layers + lm_head
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    sd = load_file(d / "q" / "model.safetensors")
    q = sd["model.layers.1.mlp.down_proj.weight"]  # (64, 64) uint8, two columns per byte
    node = next(n for n in nodes if n.name.startswith("model.layers.1.mlp.down_proj"))
    np.testing.assert_array_equal(inits[node.input[1]].reshape(64, -1), q.numpy())
    # no float matrix is left but the embedding table (every linear is quantized)
    floats = [k for k, v in inits.items() if v.dtype == np.float32 and v.ndim == 2]
    assert floats == ["model.model.embed_tokens.weight"]
    weights = sum(v.nbytes for v in inits.values())
    stored = (d / "q" / "model.safetensors").stat().st_size
    assert weights < 1.05 * stored, (weights, stored)  # lmstack's checkpoint's bytes (the float export's are 2.6x)
    graph = onnx.load(str(d / "onnx" / "model.onnx"))
    del graph.graph.initializer[:]
    assert (d / "onnx" / "model.onnx").stat().st_size < weights + graph.ByteSize() + 128 * len(inits)  # + names


def test_logits_and_greedy_tokens_equal_lmstack_quantized(setup):
    from lmstack.export.onnx_runtime import OnnxCausalLM
    from lmstack.quant import load_quantized

    d = setup
    model = load_quantized(d / "q")
    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pos = torch.arange(9).expand(2, 9).contiguous()
    with torch.no_grad():
        ref = model(ids).numpy()
    lm = OnnxCausalLM(d / "onnx")
    got, past = lm.forward(ids[:, :6].numpy(), mask[:, :6].numpy(), pos[:, :6].numpy(), lm.empty_past(2))
    steps = [got]
    for t in (6, 7, 8):
        got, past = lm.forward(ids[:, t:t + 1].numpy(), mask[:, :t + 1].numpy(), pos[:, t:t + 1].numpy(), past)
        steps.append(got)
    got = np.concatenate(steps, 1)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    prompts, n = [[5, 6, 7, 8, 9], [10, 11]], 12
    want = []
    for p in prompts:
        x = list(p)
        for _ in range(n):
            with torch.no_grad():
                x.append(int(model(torch.tensor([x]))[0, -1].argmax()))
        want.append(x[len(p):])
    assert lm.generate(prompts, max_new_tokens=n) == want


def test_bad_quantized_exports_are_one_line(setup, tmp_path, capsys):
    from lmstack.cli import main

    d = setup
    assert main(["export", "--model", str(d / "q"), "--format", "onnx", "--dtype", "int8",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds int4 weights" in err[0] and "--dtype int4" in err[0]
    assert main(["export", "--model", str(d / "q"), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "--dtype int8 / int4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
