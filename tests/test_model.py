"""Model, routing rules and the dense reference forward."""

from __future__ import annotations

import math

import pytest
import torch

from morserve.config import ConfigError, ModelConfig, MoRConfig
from morserve.model import MoRModel, reference_forward
from morserve.model.routing import expert_gate, expert_takes, expert_topk_select, token_choice


def cfg_for(nr=3, layers=8, router="expert", kv_mode="recursion", sharing="middle_cycle", **mor):
    return ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2,
                       mor=MoRConfig(num_recursions=nr, router=router, kv_mode=kv_mode, sharing=sharing,
                                     router_func="softmax" if router == "token" else "sigmoid", **mor))


# ---- routing rules, by hand ---------------------------------------------------------------------
def test_expert_gate_and_threshold_by_hand():
    mor = MoRConfig(num_recursions=3, router="expert", alpha=0.1)
    raw = torch.tensor([0.0, math.log(3.0), -0.01])
    assert torch.allclose(expert_gate(raw, mor), torch.tensor([0.05, 0.075, 0.1 / (1 + math.exp(0.01))]))
    assert expert_takes(raw, mor, 2).tolist() == [True, True, False]      # sigmoid >= 0.5
    mor_b = MoRConfig(num_recursions=3, router="expert", router_bias=[0.0, 0.02, -1.2])
    assert expert_takes(raw, mor_b, 2).tolist() == [True, True, True]     # bias shifts the decision
    assert expert_takes(raw, mor_b, 3).tolist() == [False, False, False]
    assert torch.allclose(expert_gate(raw, mor_b), expert_gate(raw, mor))  # ... never the gate
    tanh = MoRConfig(num_recursions=2, router="expert", router_func="tanh", alpha=0.5)
    assert tanh.routing_threshold == 0.0
    assert expert_takes(torch.tensor([0.0, -1e-3]), tanh, 2).tolist() == [True, False]
    assert torch.allclose(expert_gate(torch.tensor([math.atanh(0.5)]), tanh), torch.tensor([0.25]))
    custom = MoRConfig(num_recursions=2, router="expert", threshold=0.75)
    assert expert_takes(torch.tensor([math.log(3.0) - 1e-3, math.log(3.0) + 1e-3]), custom, 2).tolist() == [False, True]


def test_token_choice_by_hand():
    mor = MoRConfig(num_recursions=3, router="token", router_func="softmax", alpha=0.2)
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])        # softmax = [.25, .5, .25]
    depth, weight = token_choice(logits, mor)
    assert depth.tolist() == [2] and torch.allclose(weight, torch.tensor([0.1]))
    mor.router_bias = [0.3, 0.0, 0.0]                          # argmax only: .55 > .5
    depth, weight = token_choice(logits, mor)
    assert depth.tolist() == [1] and torch.allclose(weight, torch.tensor([0.05]))


def test_topk_select_by_hand():
    raw = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3]])
    eligible = torch.tensor([[True, True, True, False, True]])
    chosen = expert_topk_select(raw, eligible, 0.5)            # k = int(0.5 * 5) = 2, among eligible
    assert chosen.tolist() == [[True, False, True, False, False]]
    assert expert_topk_select(raw, eligible, 0.1).sum() == 1   # at least one


# ---- update rules on a single token (attention over one token = its own value) -----------------
def _single_token_manual(model: MoRModel, token: int) -> tuple[torch.Tensor, int]:
    mor = model.config.mor
    pos = torch.zeros(1, dtype=torch.long)
    cos, sin = model.rope(pos, torch.float32)

    def self_only(q, k, v):
        return v.repeat_interleave(q.shape[-2] // v.shape[-2], dim=-2)

    def block(x):
        for layer in model.block:
            x = layer(x, cos, sin, self_only)
        return x

    h = model.embed_tokens(torch.tensor([token]))
    for layer in model.prologue:
        h = layer(h, cos, sin, self_only)
    depth = 0
    if mor.router == "expert":
        for r in range(1, mor.num_recursions + 1):
            act = torch.sigmoid(model.routers[r - 1](h).squeeze(-1))
            if r > 1 and float(act) < 0.5:
                break
            h = h + mor.alpha * act[:, None] * block(h)
            depth = r
    else:
        probs = torch.softmax(model.router(h), -1)[0]
        depth = int(probs.argmax()) + 1
        x = h
        for _ in range(depth):
            x = block(x)
        h = h + mor.alpha * probs[depth - 1] * x
    for layer in model.epilogue:
        h = layer(h, cos, sin, self_only)
    return model.logits(h)[0], depth


@pytest.mark.parametrize("router", ["expert", "token"])
def test_update_rules_on_single_token(router):
    seen = set()
    for seed in range(6):
        model = MoRModel(cfg_for(router=router)).init_weights(seed, std=0.5)
        for token in range(0, 61, 7):
            with torch.no_grad():
                want_logits, want_depth = _single_token_manual(model, token)
                ref = reference_forward(model, torch.tensor([token]))
            assert int(ref.depths[0]) == want_depth
            assert torch.allclose(ref.logits[0], want_logits, atol=1e-5)
            seen.add(want_depth)
    assert len(seen) >= 2


# ---- layout and config --------------------------------------------------------------------------
def test_middle_cycle_and_cycle_layout():
    m = MoRModel(cfg_for(nr=3, layers=8))
    assert (len(m.prologue), len(m.block), len(m.epilogue)) == (1, 2, 1)
    assert len(m.routers) == 3 and m.routers[0].router.weight.shape == (1, 32)
    names = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert names == {"embed_tokens", "prologue", "block", "epilogue", "norm", "routers"}   # tied head
    c = MoRModel(cfg_for(nr=3, layers=6, sharing="cycle"))
    assert (len(c.prologue), len(c.block), len(c.epilogue)) == (0, 2, 0)
    t = MoRModel(cfg_for(nr=4, layers=10, router="token"))
    assert len(t.block) == 2 and t.router.router.weight.shape == (4, 32)
    v = MoRModel(cfg_for(nr=1, layers=5, router=None))
    assert len(v.block) == 3 and v.routers is None and v.router is None


@pytest.mark.parametrize("bad, message", [
    (dict(num_hidden_layers=9), r"\(L-2\) = 7 to be a positive multiple of num_recursions = 3"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(mor=MoRConfig(num_recursions=3, router="expert", router_func="softmax")), "sigmoid or tanh"),
    (dict(mor=MoRConfig(num_recursions=3, router="token", router_func="sigmoid")), "softmax"),
    (dict(mor=MoRConfig(num_recursions=3, kv_mode="paged")), "kv_mode"),
    (dict(mor=MoRConfig(num_recursions=3, capacity=[1.0, 0.5])), "3 fractions"),
    (dict(mor=MoRConfig(num_recursions=3, capacity=[1.0, 0.5, 0.7])), "must not increase"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(eos_token_id=500), "outside the vocabulary"),
])
def test_config_validation_names_the_problem(bad, message):
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2,
                  mor=MoRConfig(num_recursions=3, router="expert"))
    fields.update(bad)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields).validate()


def test_config_json_round_trip_and_hf_llama(tmp_path):
    cfg = cfg_for(nr=2, router="token", alpha=0.3, router_bias=[0.1, 0.0])
    cfg.save(tmp_path)
    assert ModelConfig.load(tmp_path) == cfg
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 1, "vocab_size": 100, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
    vanilla = ModelConfig.from_dict(hf)
    assert vanilla.mor.num_recursions == 1 and vanilla.mor.router is None and vanilla.num_block_layers == 2
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({**hf, "mor": {"num_recursion": 2}})
    with pytest.raises(ConfigError, match="missing required"):
        ModelConfig.from_dict({"hidden_size": 8})


# ---- the reference forward ----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["expert", "token", None])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_reference_is_causal(router, kv_mode):
    seed = int(torch.randint(0, 1 << 30, (1,)))
    model = MoRModel(cfg_for(router=router, kv_mode=kv_mode)).init_weights(seed, std=0.4)
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = reference_forward(model, ids)
        for cut in (1, 7, 16):
            prefix = reference_forward(model, ids[:, :cut])
            assert torch.allclose(prefix.logits, full.logits[:, :cut], rtol=1e-4, atol=1e-4), f"seed {seed}"
            assert torch.equal(prefix.depths, full.depths[:, :cut])
    if router is not None:
        assert full.depths.unique().numel() >= 2, "routing should be non-trivial at this init"
    else:
        assert (full.depths == 3).all()


def test_kv_modes_agree_until_a_token_goes_deeper():
    """Both KV modes compute recursion 1 identically; they must agree on every token before the
    first one that takes recursion 2, and differ after (deeper attention reads other K/V)."""
    model = MoRModel(cfg_for(router="expert", kv_mode="recursion")).init_weights(4, std=0.5)
    shared = MoRModel(cfg_for(router="expert", kv_mode="share_first"))
    shared.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = reference_forward(model, ids), reference_forward(shared, ids)
    # depth-1 computation is identical in both modes: tokens that stay at depth 1 before any
    # token reached depth 2 get identical logits
    first_deep = int((a.depths[0] >= 2).nonzero()[0]) if (a.depths[0] >= 2).any() else 20
    assert torch.allclose(a.logits[0, :first_deep], b.logits[0, :first_deep], atol=1e-5)
    assert not torch.allclose(a.logits, b.logits, atol=1e-4)


def test_topk_routing_matches_capacities():
    model = MoRModel(cfg_for(nr=4, layers=10, router="expert")).init_weights(2, std=0.4)
    ids = torch.randint(0, 61, (3, 40))
    with torch.no_grad():
        out = reference_forward(model, ids, routing="topk")
    for r, cap in enumerate(model.config.mor.capacities):
        assert (out.selected[r].sum(-1) == max(1, int(cap * 40))).all()
        if r:
            assert not (out.selected[r] & ~out.selected[r - 1]).any()    # nested
    with pytest.raises(ValueError, match="routing"):
        reference_forward(model, ids, routing="sample")


def test_cpu_linear_follows_weight_changes():
    """layers.linear's oneDNN copy of a weight (float32 CPU inference) is x @ w.T for fresh random
    shapes, and is remade when the weight changes in place or gets new storage; autograd and
    other dtypes take torch's linear."""
    import gc

    from morserve.model import layers

    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, (1,))))
    rows, d_in, d_out = (int(n) for n in torch.randint(1, 70, (3,), generator=gen))
    w = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen))
    x = torch.randn(2, rows, d_in, generator=gen)
    for change in (None, "in place", "new storage"):
        if change == "in place":
            with torch.no_grad():
                w.mul_(-0.5)
        elif change == "new storage":
            w.data = torch.randn(d_out, d_in, generator=gen)
        with torch.inference_mode():
            assert torch.allclose(layers.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4), change
    y = x.clone().requires_grad_()
    layers.linear(y, w).sum().backward()
    assert torch.allclose(y.grad, w.detach().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    half = w.detach().to(torch.bfloat16)
    assert layers.linear(x.to(torch.bfloat16), half).dtype == torch.bfloat16
    if layers._ONEDNN:
        key = id(w)
        assert key in layers._PACKED
        del w
        gc.collect()
        assert key not in layers._PACKED          # the copy goes with its weight
