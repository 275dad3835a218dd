"""The router kinds behind morserve.model.routing.Routing (none / expert / token) against the
routing math written out from design.md, on fresh random models and inputs: the state each kind
keeps at entry (in the pool rows), the residual update and continue decision of one block pass
(within each token's depth cap), and the one-GEMM evaluation of every expert router."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import tiny_model
from morserve.model.routing import ExpertRouting, PoolRows, Routing, TokenRouting, routing_for


def _inputs(model, t: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d, nr = model.config.hidden_size, model.config.mor.num_recursions
    h, x = torch.randn(t, d, generator=gen), torch.randn(t, d, generator=gen)
    depth = torch.randint(1, nr + 1, (t,), generator=gen)
    return h, x, depth, gen


def test_routing_for_picks_one_object_per_kind():
    assert type(tiny_model(None, nr=1).routing) is Routing
    assert type(tiny_model("expert").routing) is ExpertRouting
    assert type(tiny_model("token").routing) is TokenRouting
    model = tiny_model("token")
    assert routing_for(model.config.mor).kind == "token" and model.router is not None and model.routers is None


@pytest.mark.parametrize("router_type", ["linear", "mlp"])
def test_expert_router_logits_equal_each_router(router_type):
    model = tiny_model("expert", nr=4, seed=random.randrange(1 << 30))
    model.config.mor.router_type = router_type
    from morserve.model.mor import MoRModel
    model = MoRModel(model.config).init_weights(random.randrange(1 << 30), std=0.3)
    h = torch.randn(9, model.config.hidden_size)
    each = torch.stack([model.expert_router_logit(r, h) for r in range(1, 5)], dim=-1)
    torch.testing.assert_close(model.expert_router_logits(h), each, rtol=1e-5, atol=1e-5)


def _pool(model, n: int, gen: torch.Generator) -> PoolRows:
    """Random pool rows for n tokens (+ scratch), every token at the config's cap and threshold."""
    d, mor = model.config.hidden_size, model.config.mor
    return PoolRows(hidden=torch.randn(n + 1, d, generator=gen), entry=torch.randn(n + 1, d, generator=gen),
                    score=torch.rand(n + 1, generator=gen), cap=torch.full((n + 1,), mor.num_recursions),
                    threshold=torch.full((n + 1,), mor.routing_threshold))


@torch.no_grad()
def test_expert_routing_update_is_the_gated_threshold_rule():
    model = tiny_model("expert", nr=3, seed=random.randrange(1 << 30))
    mor = model.config.mor
    mor.router_bias = [0.0, 0.3, -0.2]
    kind = routing_for(mor)
    h, x, depth, gen = _inputs(model, 40, random.randrange(1 << 30))
    rows, residual = _pool(model, 50, gen), torch.randn_like(x)
    slots = torch.randperm(50, generator=gen)[:40]
    assert kind.enter(model, rows, slots, x, residual) is None
    torch.testing.assert_close(rows.hidden[slots], residual + x)
    torch.testing.assert_close(rows.score[slots], model.expert_router_logit(1, residual + x))
    rows.hidden[slots] = h
    rows.score[slots] = score = torch.stack([model.expert_router_logit(int(d), h[i]) for i, d in enumerate(depth)])
    rows.cap[slots[::4]] = 1                                      # a request capping the depth at 1
    cont = kind.update(model, rows, slots, x, residual, depth, torch.zeros_like(depth))
    for i, d in enumerate(depth.tolist()):
        gate = mor.alpha * torch.sigmoid(score[i])
        new_h = rows.hidden[slots[i]]
        torch.testing.assert_close(new_h, h[i] + gate * (residual[i] + x[i]))
        if d < mor.num_recursions:
            raw = model.expert_router_logit(d + 1, new_h)
            torch.testing.assert_close(rows.score[slots[i]], raw, rtol=1e-5, atol=1e-5)
            takes = bool(torch.sigmoid(raw + mor.router_bias[d]) >= mor.routing_threshold)
            assert bool(cont[i]) == (takes and i % 4 != 0)
        else:
            assert not cont[i]


@torch.no_grad()
def test_token_routing_chooses_depth_at_entry_and_gates_the_final_recursion():
    model = tiny_model("token", nr=4, seed=random.randrange(1 << 30))
    mor = model.config.mor
    kind = routing_for(mor)
    h, x, depth, gen = _inputs(model, 40, random.randrange(1 << 30))
    rows, residual = _pool(model, 40, gen), torch.randn_like(x)
    slots = torch.randperm(40, generator=gen)
    target = kind.enter(model, rows, slots, h, None)
    probs = torch.softmax(model.token_router_logits(h), -1)
    assert torch.equal(target, probs.argmax(-1) + 1)
    torch.testing.assert_close(rows.score[slots], mor.alpha * probs.max(-1).values)
    assert torch.equal(rows.entry[slots], h) and torch.equal(rows.hidden[slots], h)
    rows.entry[slots] = entry = torch.randn_like(h)
    weight = rows.score[slots]
    cont = kind.update(model, rows, slots, x, residual, depth, target)
    for i, (d, t) in enumerate(zip(depth.tolist(), target.tolist())):
        stream = residual[i] + x[i]
        want = entry[i] + weight[i] * stream if d == t else stream
        torch.testing.assert_close(rows.hidden[slots[i]], want)
        assert bool(cont[i]) == (t > d)


@torch.no_grad()
def test_token_routing_respects_the_depth_cap():
    model = tiny_model("token", nr=4, seed=random.randrange(1 << 30))
    kind = routing_for(model.config.mor)
    h, _, _, gen = _inputs(model, 30, random.randrange(1 << 30))
    rows, slots = _pool(model, 30, gen), torch.arange(30)
    rows.cap[:] = torch.randint(1, 5, (31,), generator=gen)
    target = kind.enter(model, rows, slots, h, None)
    probs = torch.softmax(model.token_router_logits(h), -1)
    capped = probs.masked_fill(torch.arange(1, 5) > rows.cap[:30, None], -1.0)
    assert torch.equal(target, capped.argmax(-1) + 1) and bool((target <= rows.cap[:30]).all())


@torch.no_grad()
def test_no_router_takes_every_recursion():
    model = tiny_model(None, nr=3, seed=random.randrange(1 << 30))
    kind = routing_for(model.config.mor)
    h, x, depth, gen = _inputs(model, 12, 1)
    rows, slots = _pool(model, 12, gen), torch.randperm(12, generator=gen)
    assert kind.enter(model, rows, slots, h, x) is None
    assert torch.equal(rows.hidden[slots], x + h)
    cont = kind.update(model, rows, slots, x, h, depth, depth)
    assert torch.equal(rows.hidden[slots], h + x) and torch.equal(cont, depth < 3)


@pytest.mark.parametrize("router, kv_mode", [("expert", "recursion"), ("token", "share_first")])
def test_engine_serves_mlp_routers_like_the_reference(router, kv_mode):
    """MLP routers (router_type "mlp") take the plain-op path of the fused routing: the engine's
    greedy tokens and depths, per tick and in the decode loop, equal the dense reference's."""
    from engine_utils import check_against_reference, run_to_completion
    from morserve.engine import EngineArgs, LLMEngine, SamplingParams
    from morserve.model.mor import MoRModel

    seed = random.randrange(1 << 30)
    cfg = tiny_model(router, kv_mode, nr=3).config
    cfg.mor.router_type = "mlp"
    model = MoRModel(cfg).init_weights(seed, std=0.3).eval()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = {"a": [3, 1, 4, 1, 5], "b": [9, 2], "c": [6, 5, 3, 5, 8, 9, 7]}
    for steps in (1, 3):
        engine = LLMEngine(model, None, EngineArgs(model=model, max_num_batched_tokens=16, block_size=4,
                                                    num_kv_blocks=400, max_num_seqs=4, num_scheduler_steps=steps))
        results = run_to_completion(engine, {0: [(rid, p, params) for rid, p in prompts.items()]})
        ties = sum(check_against_reference(model, p, results[r].outputs[0].token_ids, results[r].outputs[0].depths)
                   for r, p in prompts.items())
        assert ties <= 1 and engine.check_no_leak()
