"""The engine's batch-1 decode fast paths against transformers: a lone sequence whose KV blocks are
scattered over the pool (gathered slot by slot, no mask), the contiguous-slice path, and the batched
decode path with its additive float mask -- all must give transformers' greedy tokens. These are the eager paths (the compiled CPU kernel, tested in
test_kernels.py, takes decode-only steps when it is available), so the engines here turn the kernel off."""

from __future__ import annotations

import pytest
import torch

from lmstack.model import load_model
from lmstack.serve.engine import LLMEngine
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_greedy, hf_is_greedy, hf_model

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: sliding window 8 cuts the visible range
def arch_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"dec_{request.param}")
    return request.param, path, hf_model(request.param, path)


def test_lone_decode_over_scattered_blocks_matches_transformers(arch_dir):
    """A and B decode together with 4-token blocks, so their block tables interleave in the pool; A is
    aborted and B decodes alone over non-consecutive blocks: the scattered-slot path must be taken and B's
    tokens must still be transformers' greedy continuation."""
    arch, path, hf = arch_dir
    eng = LLMEngine(load_model(path, device="cpu"), use_kernel=False, block_size=4, enable_prefix_caching=False)
    runner = eng.runner
    calls = {"scattered": 0, "batched": 0}
    orig_slots, orig_visible = runner._visible_slots, runner._visible

    def spy_slots(*args):  # (seq, window)
        calls["scattered"] += 1
        return orig_slots(*args)

    def spy_visible(*args):  # (qpos, nb, window)
        calls["batched"] += 1
        return orig_visible(*args)

    runner._visible_slots, runner._visible = spy_slots, spy_visible
    pa, pb = [5, 6, 7, 8, 9, 10], list(range(20, 31))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eng.add_request(pa, params, request_id="a")
    eng.add_request(pb, params, request_id="b")
    for _ in range(10):  # both decoding: 10 steps allocate interleaved blocks
        eng.step()
    assert calls["batched"] > 0  # two decodes at once use the padded, masked path
    eng.abort_request("a")
    seq_b = eng.requests["b"].seqs[0]
    bt = seq_b.block_table
    assert any(bt[i + 1] != bt[i] + 1 for i in range(len(bt) - 1)), bt  # really scattered
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    assert calls["scattered"] > 0, arch
    got = final.outputs[0].token_ids
    assert len(got) == 24
    assert got == hf_greedy(hf, pb, 24), arch
    assert eng.block_manager.num_used == 0


def test_lone_decode_contiguous_and_long_context_matches_transformers(arch_dir):
    """A single fresh request (consecutive blocks: the zero-copy slice path) well past mistral's window."""
    arch, path, hf = arch_dir
    eng = LLMEngine(load_model(path, device="cpu"), use_kernel=False, block_size=4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    req = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    got = req.seqs[0].output_token_ids
    assert got == hf_is_greedy(hf, prompt, got), arch


def test_fused_projections_keep_outputs_names_grads_and_saving(tmp_path):
    """After ``fuse_projections`` (done by the engine): logits equal transformers', state_dict has the same
    names and values and saves / reloads, gradients still reach q_proj / gate_proj, and ``.to()`` falls
    back to the separate matmuls."""
    from lmstack.model import save_model

    path = tmp_path / "m"
    hf = hf_model("qwen2", path)  # q/k/v biases
    model = load_model(path, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[4, 8, 15, 16, 23, 42, 7]])
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == attn.fused_qkv[0].data_ptr()  # the parameters are views now
    assert attn.v_proj.bias.data_ptr() > attn.fused_qkv[1].data_ptr()
    # column-major storage (faster matrix-vector products), shapes unchanged
    for lin in (attn.q_proj, attn.o_proj, mlp.down_proj, model.lm_head):
        assert lin.weight.stride()[0] == 1 and lin.weight.shape == before[
            next(k for k in before if before[k].shape == lin.weight.shape)].shape
    with torch.inference_mode():
        ref = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    save_model(model, tmp_path / "saved")  # the parameters are views into the fused weights
    again = load_model(tmp_path / "saved", device="cpu")
    with torch.inference_mode():
        torch.testing.assert_close(again(ids), ref, atol=1e-5, rtol=1e-5)
    # training: gradients flow into the named parameters (separate matmuls under autograd)
    model.zero_grad()
    model(ids).sum().backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert mlp.up_proj.weight.grad is not None and mlp.up_proj.weight.grad.abs().sum() > 0
    # in-place updates (an optimizer step) are seen by the fused path
    with torch.no_grad():
        attn.k_proj.weight.mul_(0.5)
        hf.model.layers[0].self_attn.k_proj.weight.mul_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    # .to(dtype) re-allocates the weights: the stale fused copy must not be used
    m64 = model.to(torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(m64(ids).float(), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_unmasked_cuda_steps_skip_cudnn_attention(arch_dir, monkeypatch):
    """On CUDA, steps whose attention needs no mask (a lone decode, prefills from position 0) run SDPA without
    cuDNN attention, which plans per key length (a new plan at every decode step; measured on an H100). The
    policy is checked directly, then forced on this CPU: the steps it covers are the unmasked ones, the
    restricted-backend path gives transformers' greedy tokens, and masked (batched) steps keep the default."""
    from torch.nn.attention import SDPBackend

    import lmstack.serve.runner as runner_mod

    assert runner_mod.sdpa_backends(torch.device("cpu"), masked=False) is None
    assert runner_mod.sdpa_backends(torch.device("cuda"), masked=True) is None
    chosen = runner_mod.sdpa_backends(torch.device("cuda"), masked=False)
    assert SDPBackend.CUDNN_ATTENTION not in chosen and SDPBackend.MATH in chosen

    arch, path, hf = arch_dir
    seen = []

    def policy(device, masked):  # as on CUDA, recording which steps take the restricted backends
        seen.append(masked)
        return None if masked else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    monkeypatch.setattr(runner_mod, "sdpa_backends", policy)
    eng = LLMEngine(load_model(path, device="cpu"), use_kernel=False, block_size=4, enable_prefix_caching=False)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), request_id="a")
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    assert seen and not any(seen)  # direct prefill + lone decodes: every step unmasked
    assert final.outputs[0].token_ids == hf_greedy(hf, prompt, 12), arch
    seen.clear()
    for i, p in enumerate([prompt, list(range(20, 31))]):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), request_id=f"b{i}")
    while eng.has_unfinished_requests():
        eng.step()
    assert True in seen  # two decodes at once: the padded, masked path keeps PyTorch's own choice
