"""AWQ (Lin et al. 2023) against its published behaviour: with a few large-activation input channels, scaling them
before group-wise int4 lowers the output error well below round-to-nearest at the same group size, on held-out
activations; the scale folding leaves the float model unchanged; a checkpoint loads and beats RTN end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.errors import ConfigError
from lmstack.quant.awq import awq_quantize_model, awq_scales, rtn_int4
from tests.export_fixtures import tiny_model_dir
from tests.tokenizer_fixtures import corpus

OUTLIERS = [3, 70, 150, 200]


def _acts(n: int, k: int, g: torch.Generator, outliers: bool = True) -> torch.Tensor:
    x = torch.randn(n, k, generator=g)
    if outliers:
        x[:, OUTLIERS] *= 30  # the "salient channels" of the paper's Figure 2
    return x


def _err(x, w, w_hat):
    return float((x @ w_hat.t() - x @ w.t()).pow(2).mean())


def test_awq_beats_rtn_on_held_out_activations_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    calib, held_out = _acts(2048, 256, g), _acts(2048, 256, g)
    w = torch.randn(128, 256, generator=g) * 0.02
    for gs in (32, 64, 128):
        s, alpha, ratio = awq_scales(calib, [w], gs)
        rtn, awq = _err(held_out, w, rtn_int4(w, gs)), _err(held_out, w, rtn_int4(w * s, gs) / s)
        assert alpha > 0 and ratio < 1
        assert awq < 0.5 * rtn, (gs, awq, rtn)
        assert s[OUTLIERS].min() > s.median() * 2  # the salient channels are the ones scaled up


def test_awq_is_never_worse_than_rtn_on_its_calibration_set():
    """alpha = 0 is round-to-nearest and is on the grid: without outliers AWQ may pick it, never something worse."""
    g = torch.Generator().manual_seed(1)
    x, w = _acts(1024, 128, g, outliers=False), torch.randn(64, 128, generator=g)
    s, alpha, ratio = awq_scales(x, [w], 32)
    assert ratio <= 1.0
    assert _err(x, w, rtn_int4(w * s, 32) / s) <= _err(x, w, rtn_int4(w, 32)) * (1 + 1e-6)
    s0, _, _ = awq_scales(x, [w], 32, n_grid=1)  # the grid's only point is alpha = 0: all ones
    torch.testing.assert_close(s0, torch.ones(128))


def _outlier_model(tmp_path, **kw):
    """A tiny llama whose norms give a few hidden channels 15x the activation of the rest (what trained LLMs show)."""
    d = tmp_path / "m"
    tiny_model_dir("llama", d, initializer_range=0.1, **kw)
    sd = load_file(str(d / "model.safetensors"))
    for k in sd:
        if k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            sd[k][[3, 17, 40]] = 15.0
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "calib.txt").write_text("\n".join(corpus(40)))
    return d


def test_scale_folding_keeps_the_float_model(tmp_path):
    """Folding 1/s into the norms and the v / up rows (MHA, so v -> o is scaled too) changes no logit."""
    from lmstack.model.hf_io import load_model
    from lmstack.quant.checkpoint import calibration_ids

    d = _outlier_model(tmp_path, num_key_value_heads=4)
    model = load_model(d, dtype="float32")
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    w_norm = model.model.layers[0].input_layernorm.weight.clone()
    awq_quantize_model(model, calibration_ids(d, tmp_path / "calib.txt", seq_len=64), 32, quantize=False)
    assert not torch.equal(w_norm, model.model.layers[0].input_layernorm.weight)  # scales were folded
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=1e-4, rtol=1e-4)


def test_awq_checkpoint_loads_and_is_closer_to_float_than_rtn(tmp_path):
    from lmstack.cli import main
    from lmstack.model.hf_io import load_model
    from lmstack.quant import load_any, quantization_config

    d = _outlier_model(tmp_path)
    for method in ("int4", "awq"):
        args = ["quantize", "--model", str(d), "--method", method, "--group-size", "32", "--out", str(tmp_path / method)]
        assert main(args + (["--calib", str(tmp_path / "calib.txt")] if method == "awq" else [])) == 0
    assert quantization_config(tmp_path / "awq")["calibration"] == "awq"
    ids = torch.randint(3, 384, (4, 48), generator=torch.Generator().manual_seed(5))  # not the calibration text
    with torch.no_grad():
        ref = load_model(d, dtype="float32")(ids)
        err = {m: float((load_any(tmp_path / m)(ids) - ref).pow(2).mean()) for m in ("int4", "awq")}
    assert err["awq"] < 0.7 * err["int4"], err


def test_awq_errors(tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.model.hf_io import load_model

    d = _outlier_model(tmp_path)
    capsys.readouterr()
    assert main(["quantize", "--model", str(d), "--method", "awq", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calib" in err[0] and not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="group-size 48"):
        awq_quantize_model(load_model(d), torch.zeros(1, 8, dtype=torch.long), 48)


def test_clipping_lowers_layer_output_error_vs_no_clipping():
    """AWQ's auto_clip on fixed data: heavy-tailed weights (a few large values per group widen the int4 step for the
    rest), Gaussian activations. The clipped weight's output error on held-out activations, computed directly as
    ``|X W_hat^T - X W^T|^2``, is lower than round-to-nearest without clipping, at every group size."""
    from lmstack.quant.awq import apply_clip, clip_search

    g = torch.Generator().manual_seed(0)
    calib, held_out = torch.randn(2048, 256, generator=g), torch.randn(2048, 256, generator=g)
    w = torch.randn(96, 256, generator=g) * 0.02
    spikes = torch.rand(96, 256, generator=g) < 0.02
    w[spikes] *= 6  # ~2% outlier weights
    for gs in (32, 64, 128):
        m = clip_search(w, calib.t() @ calib / calib.shape[0], gs)
        lin = torch.nn.Linear(256, 96, bias=False)
        lin.weight.data.copy_(w)
        apply_clip(lin, m, gs)
        clipped = lin.weight.data
        assert (m <= w.view(96, -1, gs).abs().amax(-1) + 1e-7).all() and (clipped.abs() <= w.abs() + 1e-7).all()
        assert (clipped != w).any()
        plain, cl = _err(held_out, w, rtn_int4(w, gs)), _err(held_out, w, rtn_int4(clipped, gs))
        assert cl < 0.97 * plain, (gs, cl, plain)  # measured 0.95 / 0.92 / 0.91 at group 32 / 64 / 128


def test_awq_with_clipping_lowers_each_block_output_error(tmp_path):
    """End to end on a tiny model: AWQ with clipping gives a lower logit error than AWQ without, on the calibration
    tokens (both from the same float model)."""
    from lmstack.model.hf_io import load_model

    tiny_model_dir("llama", tmp_path / "m", initializer_range=0.2)
    calib = torch.randint(3, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = load_model(tmp_path / "m", dtype="float32")
    with torch.no_grad():
        want = ref(calib)
    errs = {}
    for clip in (False, True):
        m = load_model(tmp_path / "m", dtype="float32")
        awq_quantize_model(m, calib, 32, clip=clip)
        with torch.no_grad():
            errs[clip] = float((m(calib) - want).pow(2).mean())
    assert errs[True] < errs[False], errs
