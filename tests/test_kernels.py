"""The compiled CPU decode kernel (lmstack/kernels/cpu_decode.cpp) against transformers and the eager path.

Every decode step's full logits rows (not just the argmax) are compared with transformers' logits at the same
positions, for the four architectures (q/k/v bias, q/k norm, sliding window, tied embeddings), a batch of
prompts of different lengths over 4-token blocks scattered in the pool; then the fallbacks: the kernel
turned off, models it cannot run, a failed build; and the online thread-count choice."""

from __future__ import annotations

import pytest
import torch

import lmstack.kernels as kernels
from lmstack.model import load_model
from lmstack.serve.engine import LLMEngine
from lmstack.serve.runner import ThreadTuner
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_model

torch.set_num_threads(2)

PROMPTS = [list(range(5, 25)), [30, 31, 32], [40, 41] * 9 + [7]]  # 20, 3 and 19 tokens


def _run(path, use_kernel, n=(20, 20, 20), **kw):
    """Greedy batch through the engine; returns (outputs by request, kernel calls [(positions, logits)])."""
    eng = LLMEngine(load_model(path, device="cpu"), block_size=4, enable_prefix_caching=False,
                    use_kernel=use_kernel, **kw)
    calls = []
    if eng.runner.kernel is not None:
        orig = eng.runner.kernel.__call__

        class Spy:
            tuner = eng.runner.kernel.tuner

            def __call__(self, batch):
                out = orig(batch)
                calls.append(([(s.seq.request.request_id, s.start) for s in batch], out.clone()))
                return out

        eng.runner.kernel = Spy()
    for i, p in enumerate(PROMPTS):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=n[i], ignore_eos=True, logprobs=0),
                        request_id=str(i))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return eng, done, calls


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def arch_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"kern_{request.param}")
    return request.param, path, hf_model(request.param, path)  # qwen2's fixture ties the embeddings


def test_kernel_logits_match_transformers_every_step(arch_dir):
    arch, path, hf = arch_dir
    assert kernels.load_cpu_decode(), kernels._error  # this machine has a compiler: the kernel must build
    eng, done, calls = _run(path, None)
    assert eng.kernel_reason is None and eng.runner.kernel is not None
    assert len(calls) >= 19  # every decode step of the batch went through the kernel
    # teacher-forced reference: transformers' logits for prompt + generated tokens, one forward per request
    ref = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = p + done[str(i)].token_ids
            ref[str(i)] = hf(torch.tensor([ids])).logits[0]
    checked = 0
    for entries, logits in calls:
        assert logits.shape == (len(entries), hf.config.vocab_size)
        for row, (rid, pos) in enumerate(entries):
            torch.testing.assert_close(logits[row], ref[rid][pos], atol=1e-4, rtol=1e-4, msg=f"{arch} {rid} {pos}")
            checked += 1
    assert checked >= 19 * 3 - 3
    if arch == "mistral":  # the window (8) is shorter than the contexts decoded: lo > 0 was exercised
        assert hf.config.sliding_window and max(len(p) for p in PROMPTS) + 19 > hf.config.sliding_window


def test_kernel_and_eager_engine_agree(arch_dir):
    """Same tokens and per-token logprobs (1e-4) with and without the kernel."""
    arch, path, _ = arch_dir
    _, a, _ = _run(path, None)
    eng_b, b, calls_b = _run(path, False)
    assert eng_b.runner.kernel is None and calls_b == [] and eng_b.kernel_reason == "disabled"
    for rid in a:
        assert a[rid].token_ids == b[rid].token_ids, (arch, rid)
        for x, y in zip(a[rid].logprobs, b[rid].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_kernel_max_batch_routes_bigger_batches_to_eager(arch_dir):
    _, path, _ = arch_dir
    eng, done, calls = _run(path, None, n=(20, 5, 20), kernel_max_batch=2)
    assert calls and all(len(entries) <= 2 for entries, _ in calls)  # 3-way decode steps went eager
    _, ref, _ = _run(path, False, n=(20, 5, 20))
    assert {k: v.token_ids for k, v in done.items()} == {k: v.token_ids for k, v in ref.items()}


def test_models_the_kernel_cannot_run_use_the_eager_path(tmp_path):
    from lmstack.serve.runner import kernel_supported
    from lmstack.tune.lora import LoraSpec, apply_lora

    path = tmp_path / "m"
    hf_model("llama", path)
    m = load_model(path, device="cpu")
    assert kernel_supported(m) is None
    assert "CPU" in kernel_supported(load_model(path, device="cpu", dtype="bf16"))
    assert "prefix" in kernel_supported(m, prefix_kv=[(torch.zeros(1), torch.zeros(1))])
    apply_lora(m, LoraSpec(r=2, target_modules=["q_proj"]))
    reason = kernel_supported(m)
    assert reason and "adapter" in reason
    eng = LLMEngine(m.eval(), block_size=4)
    assert eng.runner.kernel is None and eng.kernel_reason == reason
    out = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert len(out.seqs[0].output_token_ids) == 3


def test_env_off_and_failed_build(monkeypatch, tmp_path, capsys, caplog):
    path = tmp_path / "m"
    hf_model("llama", path)
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    eng = LLMEngine(load_model(path, device="cpu"))
    assert eng.runner.kernel is None and "LMSTACK_KERNELS" in eng.kernel_reason

    # a build that fails (no compiler): auto warns once (warnings, not a print) and runs eager; "1" raises a clear
    # error
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise RuntimeError("Error building extension 'x'\ng++: command not found")

    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("LMSTACK_KERNELS", "auto")
    monkeypatch.setenv("LMSTACK_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = kernels.library_path()
    assert str(lib).startswith(str(tmp_path / "cache"))
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a shared library")  # a build cut short: the cached file is dropped and rebuilt
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="lmstack.kernels"), \
            pytest.warns(kernels.KernelUnavailableWarning, match="unavailable.*command not found") as warned:
        assert kernels.load_cpu_decode() is False
    assert not lib.exists()
    assert len(warned) == 1 and warned[0].filename == __file__  # attributed to the caller, not the library
    notes = [r.getMessage() for r in caplog.records if r.name == "lmstack.kernels"]
    assert len(notes) == 1 and notes[0].startswith("building the CPU decode kernel")
    assert capsys.readouterr().err == ""  # the library printed nothing itself
    eng = LLMEngine(load_model(path, device="cpu"))
    assert eng.runner.kernel is None and "could not be built" in eng.kernel_reason
    monkeypatch.setenv("LMSTACK_KERNELS", "1")
    with pytest.raises(kernels.KernelError, match="could not be built"):
        kernels.load_cpu_decode()


def test_thread_tuner_switches_to_the_faster_choice(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    t = ThreadTuner(period=16, trials=3)
    cost = {1: 1.0, 2: 3.0}  # a busy machine: one thread is 3x faster
    seen = []
    for _ in range(16):
        nt = t.pick()
        seen.append(nt)
        t.record(nt, cost[nt])
    assert seen[:6] == [1, 2, 1, 2, 1, 2]  # trials interleave the alternative with the current choice
    assert t.current == 1 and seen[6:] == [1] * 10
    cost = {1: 1.0, 2: 0.5}  # the machine went idle: the next trial period moves back to 2 threads
    for _ in range(16):
        nt = t.pick()
        t.record(nt, cost[nt])
    assert t.current == 2
    cost = {1: 1.0, 2: 0.95}  # within the margin: no flapping
    for _ in range(16):
        nt = t.pick()
        t.record(nt, cost[nt])
    assert t.current == 2


def test_lora_adapter_is_merged_at_load_and_matches_peft(tmp_path):
    """``lmstack.load(path, adapter=LoRA)`` merges the adapter, so the kernel path serves it; the tokens equal
    peft's ``generate``, and equal the unmerged (wrapped, eager) engine's."""
    import peft

    from lmstack.serve.llm import load
    from tests.engine_fixtures import hf_greedy

    path = tmp_path / "m"
    base = hf_model("llama", path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, cfg).eval()
    pm.save_pretrained(tmp_path / "ad")
    prompt = PROMPTS[0]
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    with pm.disable_adapter():
        assert ref != hf_greedy(pm, prompt, 16)  # the adapter changes the output
    merged = load(path, adapter=tmp_path / "ad", device="cpu")
    assert merged.engine.kernel_reason is None
    wrapped = load(path, adapter=tmp_path / "ad", device="cpu", merge_lora=False)
    assert "adapter" in wrapped.engine.kernel_reason
    for llm in (merged, wrapped):
        out = llm.generate([prompt], temperature=0, max_tokens=16, ignore_eos=True, use_tqdm=False)
        assert out[0].outputs[0].token_ids == ref
