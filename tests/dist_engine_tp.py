"""The serving engine's tensor parallelism (lmstack/serve/tp.py) end to end; too many processes for the default suite
on 2 cores: ``make test-dist2d`` runs this file (tests/test_engine_tp.py is the always-on engine parity test).

- `lmstack serve --tp 2` and `lmstack serve --tp 1` of the same tiny model answer the ``openai`` client with the
  same text (greedy and seeded sampling, chat and completions); Ctrl-C (SIGINT) on the --tp 2 server exits it and
  its worker is gone; SIGKILL of rank 0 takes the worker with it (no orphan).
- more families split over 2 ranks, greedy tokens equal to --tp 1: Llama (untied head), Qwen3 (per-head q/k
  norms), Mistral (sliding window), Mixtral (replicated experts), Gemma 3 (scaled embedding, sliding / global
  layers, soft-capped logits).
- `lmstack generate --tp 2` of a model whose key/value heads do not split: one line, exit 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.engine_fixtures import hf_model
from tests.serve_fixtures import free_port, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "LMSTACK_NO_PROGRESS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def serve(model: Path, tp: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", "--model", str(model), "--port", str(port),
                             "--tp", str(tp), "--served-model-name", "m", "--log-level", "warning"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("lmstack serve did not start")


def answers(url: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Hello world! The quick brown fox"}]
    out = [c.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0).choices[0].message.content,
           c.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=1.0, seed=7)
           .choices[0].message.content]
    out += [c.completions.create(model="m", prompt=p, max_tokens=10, temperature=0).choices[0].text
            for p in ("Language models predict", "def add(a, b):")]
    return out


def gone(pids: list[int], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_served_tp2_answers_like_tp1_and_stops_cleanly(tmp_path):
    model = tiny_model_dir(tmp_path / "m")
    p1, u1 = serve(model, 1)
    try:
        ref = answers(u1)
    finally:
        p1.terminate()
        p1.wait(30)
    p2, u2 = serve(model, 2)
    try:
        workers = [c.pid for c in psutil.Process(p2.pid).children(recursive=True)]
        assert len(workers) == 1
        assert answers(u2) == ref
        assert any(ref)
        p2.send_signal(signal.SIGINT)  # Ctrl-C
        assert p2.wait(60) == 0
        assert gone(workers), "a tensor-parallel worker outlived lmstack serve"
    finally:
        if p2.poll() is None:
            p2.kill()


def test_killed_rank0_leaves_no_orphan(tmp_path):
    model = tiny_model_dir(tmp_path / "m")
    proc, _ = serve(model, 2)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.kill()  # SIGKILL: no atexit, no close(): PR_SET_PDEATHSIG / the closed pipe end the worker
    proc.wait()
    assert workers and gone(workers)


def _mixtral(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "mixtral", "gemma3"])
def test_families_split_over_two_ranks(arch, tmp_path):
    from lmstack.serve.llm import load

    if arch == "mixtral":
        _mixtral(tmp_path)
    elif arch == "gemma3":  # scaled embeddings (vocab-parallel), sliding / global layers, soft-capped logits
        from tests.test_model_gemma3 import make_gemma3

        make_gemma3(tmp_path, final_logit_softcapping=30.0)
    else:
        hf_model(arch, tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [40, 41, 42]]
    kw = dict(temperature=0, max_tokens=12, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in load(tmp_path, block_size=4).generate(prompts, **kw)]
    llm = load(tmp_path, tensor_parallel=2, block_size=4)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, **kw)] == ref
    finally:
        llm.close()


def test_cli_bad_tp_is_one_line_exit_2(tmp_path):
    hf_model("llama", tmp_path, num_key_value_heads=1)
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--model", str(tmp_path), "--tp", "2",
                        "-p", "hi"], env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_key_value_heads=1" in lines[0] and "Traceback" not in r.stderr
