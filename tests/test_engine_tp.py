"""Tensor parallelism in the serving engine (lmstack/serve/tp.py): an engine split over 2 gloo processes against
the same engine in one process, on a tiny random Qwen2 (q/k/v biases, tied embeddings, GQA 4 heads / 2 kv heads).

The schedule has requests arriving while others decode, a prompt long enough to be prefilled in chunks and
small KV blocks, so decode, chunked prefill and mixed steps all run sharded. Greedy tokens must be equal (and
be transformers' argmax), the top log-probs equal within 1e-4 (the row-parallel layers sum partial products
across ranks: another order of additions, not bit-equality), seeded sampling must pick the same tokens; closing
the engine must leave no worker process. The served --tp 2 model vs --tp 1 through the ``openai`` client and the
CLI's exit-2 lines are in tests/dist_engine_tp.py (`make test-dist2d`).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.serve.llm import load
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_is_greedy, hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4], list(range(11, 50)), [200, 201, 202, 17], [9] * 13]
ARRIVE = [0, 0, 2, 3, 5]  # the engine step at which each request is added
ENGINE = dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_qwen2")
    return path, hf_model("qwen2", path)


@pytest.fixture(scope="module")
def engines(model_dir):
    one = load(model_dir[0], tensor_parallel=1, **ENGINE)
    two = load(model_dir[0], tensor_parallel=2, **ENGINE)
    yield one, two
    two.close()


def run_schedule(llm, params: list[SamplingParams]) -> list:
    """Add request i at step ARRIVE[i]; step until every request finished; outputs in request order."""
    eng, done, ids, step = llm.engine, {}, [], 0
    while len(done) < len(PROMPTS):
        for i, t in enumerate(ARRIVE):
            if t == step:
                ids.append(eng.add_request(PROMPTS[i], params[i], request_id=f"r{i}").request_id)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 500
    return [done[f"r{i}"].outputs[0] for i in range(len(PROMPTS))]


def test_tp2_greedy_and_logprobs_equal_tp1(engines, model_dir):
    one, two = engines
    assert two.engine.tp is not None and "tensor parallelism" in two.engine.kernel_reason
    # each rank's KV pool holds its share of the key/value heads
    assert two.engine.runner.n_kv == one.engine.runner.n_kv // 2
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=3, ignore_eos=True) for n in (9, 6, 7, 8, 5)]
    a, b = run_schedule(one, params), run_schedule(two, params)
    for prompt, x, y in zip(PROMPTS, a, b):
        assert y.token_ids == x.token_ids
        assert hf_is_greedy(model_dir[1], prompt, y.token_ids) == y.token_ids  # and both are transformers' argmax
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert ly.top.keys() == lx.top.keys()
            torch.testing.assert_close(torch.tensor(list(ly.top.values())), torch.tensor(list(lx.top.values())),
                                       atol=1e-4, rtol=0)


def test_tp2_seeded_sampling_equals_tp1(engines):
    one, two = engines
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=8, ignore_eos=True)
              for i in range(len(PROMPTS))]
    a, b = run_schedule(one, params), run_schedule(two, params)
    assert [y.token_ids for y in b] == [x.token_ids for x in a]
    assert len({tuple(x.token_ids) for x in a}) > 1  # really sampled: the requests differ


def test_tp_refuses_scoring_and_bad_configs(engines, model_dir, tmp_path, monkeypatch):
    _, two = engines
    with pytest.raises(ConfigError, match="tensor parallelism"):
        two.engine.embed([5, 6, 7])
    odd = tmp_path / "kv1"
    hf_model("llama", odd, num_key_value_heads=1)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=1.*--tp"):
        load(odd, tensor_parallel=2)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="CPU core per rank"):
        load(model_dir[0], tensor_parallel=2)
    monkeypatch.setenv("LMSTACK_KERNELS", "on")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    with pytest.raises(ConfigError, match="LMSTACK_KERNELS=on"):
        load(model_dir[0], tensor_parallel=2)
    monkeypatch.delenv("LMSTACK_KERNELS")
    with pytest.raises(ConfigError, match="close it first"):  # one tensor-parallel engine per process
        load(model_dir[0], tensor_parallel=2)


def test_close_stops_the_workers(engines):  # last: closes the module's engine
    llm = engines[1]
    pids = llm.engine.tp.pids
    assert all(_alive(p) for p in pids)
    llm.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(ConfigError, match="stopped"):
        llm.generate([[5, 6]], max_tokens=2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
