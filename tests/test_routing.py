"""The router kinds behind morserve.model.routing.Routing (none / expert / token) against the
routing math written out from design.md, on fresh random models and inputs: the state each kind
keeps at entry, the residual update and continue decision of one block pass, and the one-GEMM
evaluation of every expert router."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import tiny_model
from morserve.model.routing import ExpertRouting, Routing, TokenRouting, routing_for


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


@torch.no_grad()
def test_expert_routing_update_is_the_gated_threshold_rule():
    model = tiny_model("expert", nr=3, seed=random.randrange(1 << 30))
    mor = model.config.mor
    mor.router_bias = [0.0, 0.3, -0.2]
    kind = routing_for(mor)
    h, x, depth, _ = _inputs(model, 40, random.randrange(1 << 30))
    target, score = kind.enter(model, h)
    assert target is None
    torch.testing.assert_close(score, model.expert_router_logit(1, h))
    score = torch.stack([model.expert_router_logit(int(d), h[i]) for i, d in enumerate(depth)])
    new_h, cont, next_score = kind.update(model, h, x, depth, torch.zeros_like(depth), None, score)
    for i, d in enumerate(depth.tolist()):
        gate = mor.alpha * torch.sigmoid(score[i])
        torch.testing.assert_close(new_h[i], h[i] + gate * x[i])
        if d < mor.num_recursions:
            raw = model.expert_router_logit(d + 1, new_h[i])
            torch.testing.assert_close(next_score[i], raw, rtol=1e-5, atol=1e-5)
            takes = bool(torch.sigmoid(raw + mor.router_bias[d]) >= mor.routing_threshold)
            assert bool(cont[i]) == takes
        else:
            assert not cont[i]


@torch.no_grad()
def test_token_routing_chooses_depth_at_entry_and_gates_the_final_recursion():
    model = tiny_model("token", nr=4, seed=random.randrange(1 << 30))
    mor = model.config.mor
    kind = routing_for(mor)
    h, x, depth, _ = _inputs(model, 40, random.randrange(1 << 30))
    target, weight = kind.enter(model, h)
    probs = torch.softmax(model.token_router_logits(h), -1)
    assert torch.equal(target, probs.argmax(-1) + 1)
    torch.testing.assert_close(weight, mor.alpha * probs.max(-1).values)
    entry = torch.randn_like(h)
    new_h, cont, _ = kind.update(model, h, x, depth, target, entry, weight)
    for i, (d, t) in enumerate(zip(depth.tolist(), target.tolist())):
        want = entry[i] + weight[i] * x[i] if d == t else x[i]
        torch.testing.assert_close(new_h[i], want)
        assert bool(cont[i]) == (t > d)


def test_no_router_takes_every_recursion():
    model = tiny_model(None, nr=3, seed=random.randrange(1 << 30))
    kind = routing_for(model.config.mor)
    h, x, depth, _ = _inputs(model, 12, 1)
    assert kind.enter(model, h) == (None, None)
    new_h, cont, score = kind.update(model, h, x, depth, depth, None, None)
    assert new_h is x and score is None and torch.equal(cont, depth < 3)
