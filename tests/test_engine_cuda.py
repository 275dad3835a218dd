"""GPU path (runs only where CUDA is present): the engine in bf16 with the Triton kernels must
give the fp32 reference's greedy tokens wherever the reference's top-2 margin is clear, and the
same depths wherever the routing decision is not a near-tie, with the block pass replayed from
CUDA graphs (the default) and eagerly, and with the multi-step decode loop's captured tick."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import run_to_completion, tiny_model
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.model import reference_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MARGIN = 0.1          # logit gap above which bf16 must agree with fp32


@pytest.mark.parametrize("enforce_eager, steps", [(False, 1), (True, 1), (False, 4)])
@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
@pytest.mark.parametrize("router, kv_mode", [("expert", "recursion"), ("token", "share_first")])
def test_bf16_engine_matches_fp32_reference(batching, router, kv_mode, enforce_eager, steps):
    rng = random.Random()
    model = tiny_model(router, kv_mode, 3, seed=rng.randrange(1 << 30))
    gpu = tiny_model(router, kv_mode, 3)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    engine = LLMEngine(gpu, None, EngineArgs(model=gpu, batching=batching, block_size=16, num_kv_blocks=4000,
                                             max_model_len=256, enforce_eager=enforce_eager,
                                             num_scheduler_steps=steps))
    assert (engine.runner.graphed is None) == enforce_eager
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(rng.randint(1, 60))] for i in range(16)}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    results = run_to_completion(engine, {0: [(rid, p, params) for rid, p in prompts.items()]})
    checked = agreed = 0
    for rid, prompt in prompts.items():
        toks = results[rid].outputs[0].token_ids
        with torch.no_grad():
            ref = reference_forward(model, torch.tensor(prompt + toks))
        for i, tok in enumerate(toks):
            logits = ref.logits[len(prompt) - 1 + i]
            top = logits.topk(2)
            if float(top.values[0] - top.values[1]) > MARGIN:
                checked += 1
                agreed += tok == int(top.indices[0])
    assert checked > 100 and agreed == checked, f"{agreed}/{checked} clear-margin tokens agree"
    if not enforce_eager:   # graphs were captured lazily, for the padded sizes the ticks needed
        graphed = engine.runner.graphed
        assert graphed.graphs and set(graphed.graphs) <= set(graphed.sizes)
    if steps > 1:           # the decode loop ran its tick from a CUDA graph
        assert engine.decode_loop.graphs
    assert engine.check_no_leak()
