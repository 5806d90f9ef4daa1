"""GPTQ int4 calibration: lower layer-output error than round-to-nearest on correlated inputs with outlier
features (the setting of Frantar et al. 2022), the error measured here as ``mean((X W^T - X Q^T)^2)``, and a
GPTQ checkpoint that loads and matches its own dequantized weights."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.quant import load_quantized, quantization_config, quantize_checkpoint
from lmstack.quant.gptq import gptq_int4
from lmstack.quant.packed import dequantize_int4, quantize_int4
from tests.export_fixtures import VOCAB, tiny_model_dir
from tests.tokenizer_fixtures import corpus


def _inputs(n, mix, g):
    x = torch.randn(n, mix.shape[0], generator=g) @ mix  # correlated features
    x[:, :8] *= 10  # a few large-magnitude features, as in LLM activations
    return x


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_beats_round_to_nearest_on_layer_output_error(group_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    mix = torch.randn(256, 256, generator=g) * 0.3 + torch.eye(256)
    x_cal, x_new = _inputs(4096, mix, g), _inputs(2048, mix, g)  # calibrate on one sample, measure on another
    H = 2 * x_cal.t().double() @ x_cal.double() / x_cal.shape[0]
    q, s, z = gptq_int4(w, H, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == (96, 256 // group_size)
    w_gptq = dequantize_int4(q, s, z)
    w_rtn = dequantize_int4(*quantize_int4(w, group_size))

    def out_err(wq):
        return ((x_new @ w.t() - x_new @ wq.t()) ** 2).mean().item()

    assert out_err(w_gptq) < 0.5 * out_err(w_rtn)
    # every GPTQ value lies on its group's 16-level grid between the group's min and max
    levels = (w_gptq.reshape(96, -1, group_size) - (z - 8 * s)[..., None]) / s[..., None]
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)


def test_gptq_checkpoint_loads_and_runs_its_dequantized_weights(tmp_path):
    import transformers

    tiny_model_dir("llama", tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(corpus(40)), encoding="utf-8")
    out = quantize_checkpoint(tmp_path / "m", tmp_path / "gptq", method="gptq", group_size=32, calib=calib)
    qc = quantization_config(out)
    # the 7 linears of each of the 2 layers (GPTQ int4) and lm_head (int8 per channel, `--lm-head int8`, the default)
    assert qc["method"] == "int4" and qc["calibration"] == "gptq" and len(qc["modules"]) == 15
    assert "lm_head" in qc["modules"] and sum(m.startswith("model.layers.") for m in qc["modules"]) == 14
    model = load_quantized(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name in qc["modules"]:
                mod.weight.copy_(model.get_submodule(name).dequantize())
        ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="needs --calib"):
        quantize_checkpoint(tmp_path / "m", tmp_path / "x", method="gptq")
