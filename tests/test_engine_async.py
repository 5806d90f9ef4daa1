"""AsyncEngine: concurrent streams equal offline results, abort / disconnect free blocks, queue limits,
draining shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmstack.serve.async_engine import AsyncEngine
from lmstack.serve.errors import EngineShuttingDown, PromptTooLong, QueueFull
from lmstack.serve.llm import load
from lmstack.serve.types import SamplingParams
from tests.engine_fixtures import hf_model

torch.set_num_threads(2)
PROMPTS = [list(range(5, 25)), [30, 31, 32], [40, 41] * 18 + [7]]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("async")
    hf_model("qwen2", path)
    return load(path, device="cpu")


def _params(n=16):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def _collect(eng, prompt, rid, params):
    outs = [o async for o in eng.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_match_offline(llm):
    offline = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]

    async def main():
        eng = AsyncEngine(llm)
        res = await asyncio.gather(*[_collect(eng, p, f"r{i}", _params()) for i, p in enumerate(PROMPTS)])
        await eng.shutdown()
        return res

    res = asyncio.run(main())
    for outs, want in zip(res, offline):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        deltas = [t for o in outs for t in o.outputs[0].delta_token_ids]
        assert deltas == outs[-1].outputs[0].token_ids == want
        assert len(outs) > 1  # streamed, not one final blob
    assert llm.engine.block_manager.num_used == 0


def test_abort_and_disconnect_free_blocks(llm):
    async def main():
        eng = AsyncEngine(llm)
        # explicit abort: the stream ends with finish_reason "abort"
        agen = eng.generate(PROMPTS[2], _params(200), "a")
        first = await agen.__anext__()
        assert not first.finished
        assert eng.stats()["kv_blocks_used"] > 0
        await eng.abort("a")
        assert eng.stats()["kv_blocks_used"] == 0
        rest = [o async for o in agen]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        # a client that goes away: the consumer stops iterating and closes the generator
        agen = eng.generate(PROMPTS[0], _params(200), "b")
        await agen.__anext__()
        await agen.aclose()
        for _ in range(200):
            if eng.stats()["kv_blocks_used"] == 0 and eng.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.stats()["kv_blocks_used"] == 0 and not llm.engine.requests
        await eng.shutdown()

    asyncio.run(main())


def test_queue_full_prompt_too_long_and_shutdown(llm):
    async def main():
        eng = AsyncEngine(llm, max_waiting=1)
        eng._ensure_thread = lambda: None  # hold the engine thread so the request stays queued
        a = eng.generate(PROMPTS[0], _params(), "q1")
        t = asyncio.ensure_future(a.__anext__())
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full"):
            await eng.generate(PROMPTS[1], _params(), "q2").__anext__()
        del eng._ensure_thread
        eng._ensure_thread()
        eng._wake.set()
        await t
        rest = [o async for o in a]
        assert rest[-1].finished
        eng2 = AsyncEngine(llm)
        with pytest.raises(PromptTooLong):
            await eng2.generate([3] * 300, _params(), "long").__anext__()
        # drain: the in-flight request finishes, new ones are refused
        running = asyncio.ensure_future(_collect(eng2, PROMPTS[1], "d1", _params(8)))
        await asyncio.sleep(0.05)
        stop = asyncio.ensure_future(eng2.shutdown(drain=True))
        await asyncio.sleep(0)
        with pytest.raises(EngineShuttingDown):
            await eng2.generate(PROMPTS[0], _params(), "late").__anext__()
        outs = await running
        await stop
        assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 8
        st = eng2.stats()
        for k in ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "kv_usage",
                  "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_total",
                  "generation_tokens_total", "preemptions_total"):
            assert k in st
        await eng.shutdown()

    asyncio.run(main())
