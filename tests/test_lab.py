"""`morserve.lab` and the knobs it exposes: scalar capacity (keep ratio), a target depth that
steers the routed depth, sequence / middle-sequence sharing (training, and loading + serving as
a vanilla model), comparable routing entropy, `analyze --compare`, and the corpus path."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from engine_utils import one_thread  # noqa: F401 - autouse fixture: one torch thread
from morserve import lab
from morserve.checkpoint import load_checkpoint, load_pretrained
from morserve.config import ConfigError, ModelConfig, MoRConfig
from morserve.engine import LLM, SamplingParams
from morserve.model import reference_forward
from morserve.model.reference import masked_attention
from morserve.model.sharing import shared_layer_order, vanilla_view
from morserve.train import analyze
from morserve.train.command import parse_capacity
from morserve.train.depth_target import depth_loads, keep_ratio_for_depth




def _seed() -> int:
    return int(torch.randint(0, 2 ** 31, ()))


# ---- capacity and target depth ----------------------------------------------------------------
def test_scalar_capacity_is_a_geometric_keep_ratio():
    k = 0.3 + 0.6 * torch.rand(()).item()
    assert MoRConfig(num_recursions=4, router="expert", capacity=k).capacities == pytest.approx([1, k, k * k, k ** 3])
    assert MoRConfig(num_recursions=3, router="expert").capacities == pytest.approx([1, 2 / 3, 1 / 3])
    cfg = lab.build(router="expert", num_recursions=3, capacity=k).config
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).mor.capacities == cfg.mor.capacities
    with pytest.raises(ConfigError, match="keep ratio"):
        lab.build(router="expert", capacity=1.5)
    assert parse_capacity("0.5", None) == 0.5 and parse_capacity("1,0.5,0.2", None) == [1, 0.5, 0.2]
    assert parse_capacity(None, 0.4) == 0.4 and parse_capacity(None, None) is None


def test_target_depth_solutions():
    nr = int(torch.randint(2, 6, ()))
    target = 1 + (nr - 1) * (0.05 + 0.9 * torch.rand(()).item())
    k = keep_ratio_for_depth(target, nr)
    assert sum(k ** r for r in range(nr)) == pytest.approx(target, abs=1e-6)
    loads = depth_loads(target, nr)
    assert sum(loads) == pytest.approx(1.0) and sum((i + 1) * p for i, p in enumerate(loads)) == pytest.approx(target)
    assert depth_loads((nr + 1) / 2, nr) == pytest.approx([1 / nr] * nr)
    with pytest.raises(ValueError, match="target depth"):
        keep_ratio_for_depth(nr + 0.5, nr)


@pytest.mark.parametrize("router", ["token", "expert"])
def test_target_depth_steers_the_routed_depth(router, tmp_path):
    """Routed (inference-rule) mean depth on held-out samples, not the soft expectation: within
    0.05 of the target, and every depth in use."""
    depths = {}
    for target in (1.5, 2.5):
        m = lab.build(router=router, num_recursions=3, hidden_size=32, task="copy", seed=_seed() % 1000)
        # 512 held-out samples: with 128 the estimate's own noise (sd ~0.02) crossed 0.05 in ~1 run in 30
        metrics = lab.train(m, task="copy", steps=60, batch_size=16, lr=1e-2, warmup_steps=10, eval_every=10_000,
                            eval_size=512, target_depth=target)
        depths[target] = metrics["mean_depth"]
        assert abs(metrics["mean_depth"] - target) < 0.05, (target, metrics["mean_depth"])
        assert min(metrics["depth_hist"]) > 0.05, metrics["depth_hist"]
        assert m.config.mor.router_bias is not None
    assert depths[2.5] - depths[1.5] > 0.8
    # the calibrated router_bias travels with the checkpoint: the engine routes as the reference
    prompt = "<s> a b c d e f |"
    ours = lab.generate(m, prompt, max_tokens=7)
    served = LLM(model=str(lab.save(m, tmp_path / router)), device="cpu").generate(
        prompt, SamplingParams(max_tokens=7, temperature=0))[0].outputs[0]
    assert served.token_ids == ours.token_ids and served.depths == ours.depths


def test_target_depth_conflicts_with_an_explicit_capacity():
    m = lab.build(router="expert", num_recursions=3, hidden_size=32, task="copy", capacity=0.5)
    with pytest.raises(ValueError, match="one or the other"):
        lab.train(m, task="copy", steps=1, target_depth=1.5)


# ---- sequence sharing -------------------------------------------------------------------------
def test_sequence_sharing_orders_and_refuses_a_router():
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                      num_attention_heads=2, mor=MoRConfig(num_recursions=3, sharing="middle_sequence"))
    assert cfg.validate().num_block_layers == 2 and shared_layer_order(cfg) == [0, 0, 0, 1, 1, 1]
    cfg.mor.sharing = "middle_cycle"
    assert shared_layer_order(cfg) == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ConfigError, match="cannot be routed"):
        lab.build(router="expert", sharing="sequence")


@pytest.mark.parametrize("sharing", ["sequence", "middle_sequence"])
def test_sequence_sharing_forward_is_the_repeated_layer_list(sharing):
    """Oracle: apply embed, each layer in b0 b0 .. b1 b1 .. order with causal attention, norm, head."""
    m = lab.build(router=None, num_recursions=2, hidden_size=32, block_layers=2, sharing=sharing, seed=_seed() % 1000)
    model = m.model
    model.init_weights(seed=_seed() % 1000, std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    h = model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(9), h.dtype)
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool)).expand(2, 9, 9)
    layers = [*model.prologue, model.block[0], model.block[0], model.block[1], model.block[1], *model.epilogue]
    for layer in layers:
        h = layer(h, cos, sin, lambda q, k, v: masked_attention(q, k, v, causal))
    torch.testing.assert_close(reference_forward(model, ids).logits, model.logits(h))
    view = vanilla_view(model)
    assert view.block[0] is model.block[0] and view.config.mor.num_recursions == 1


def test_sequence_shared_model_trains_saves_shared_and_serves_as_vanilla(tmp_path):
    m = lab.build(router=None, num_recursions=3, hidden_size=32, block_layers=1, sharing="middle_sequence",
                  task="pattern")
    before = lab.train(m, task="pattern", steps=2, lr=1e-2, warmup_steps=1, eval_size=64)["val_loss"]
    after = lab.train(m, task="pattern", steps=40, batch_size=16, lr=1e-2, warmup_steps=5, eval_size=64)["val_loss"]
    assert after < before - 0.5
    path = lab.save(m, tmp_path / "seq")
    stored = json.loads((path / "config.json").read_text())
    assert stored["mor"]["sharing"] == "middle_sequence" and stored["num_hidden_layers"] == 5
    served, _ = load_checkpoint(path)                          # as the engine loads it
    assert served.config.mor.sharing == "middle_cycle" and served.config.num_hidden_layers == 5
    assert len(served.block) == 3 and served.block[0] is served.block[2]
    kept = lab.load(path)                                       # for more training: still shared
    assert kept.config.mor.sharing == "middle_sequence" and len(kept.model.block) == 1
    prompt = "<s> a b c a b c"
    ours = lab.generate(m, prompt, max_tokens=6)
    out = LLM(model=str(path), device="cpu").generate(prompt, SamplingParams(max_tokens=6, temperature=0))[0]
    assert out.outputs[0].token_ids == ours.token_ids


# ---- analysis ---------------------------------------------------------------------------------
def test_entropy_is_normalised_by_the_routers_maximum():
    nr = 4
    expert = lab.build(router="expert", num_recursions=nr, hidden_size=32, task="copy")
    token = lab.build(router="token", num_recursions=nr, hidden_size=32, task="copy")
    for m, maximum in ((expert, math.log(2)), (token, math.log(nr))):
        m.model.init_weights(seed=_seed() % 1000, std=0.5)
        s = lab.analyze(m, task="copy", samples=64)
        assert s.entropy_max == pytest.approx(maximum)
        assert s.entropy_norm == pytest.approx(s.entropy / maximum) and 0 <= s.entropy_norm <= 1
    # zero router weights: every decision is a coin flip, the normalised entropy is exactly 1
    for m in (expert, token):
        routers = m.model.routers if m.model.routers is not None else [m.model.router]
        for r in routers:
            torch.nn.init.zeros_(r.router.weight)
        assert lab.analyze(m, task="copy", samples=16).entropy_norm == pytest.approx(1.0, abs=1e-6)


def test_analyze_labels_token_choice_as_argmax(tmp_path):
    m = lab.build(router="token", num_recursions=3, hidden_size=32, task="copy")
    path = lab.save(m, tmp_path / "tok")
    text = tmp_path / "t.txt"
    text.write_text("<s> a b c d e f | a b c d e f </s> " * 4)
    result, _ = analyze.analyze(load_pretrained(str(path)).model, m.tokenizer.encode(text.read_text()),
                                ["a"] * 60, 64, "tok")
    report = analyze.summary(result)
    assert "argmax (token choice)" in report and "threshold" not in report
    assert result.entropy_max == pytest.approx(math.log(3))


def test_compare_cli_writes_one_table_and_figure(tmp_path, capsys):
    paths = []
    for router in ("expert", "token"):
        m = lab.build(router=router, num_recursions=3, hidden_size=32, task="counting", name=router)
        lab.train(m, task="counting", steps=5, batch_size=8, eval_size=32)
        paths.append(str(lab.save(m, tmp_path / router)))
    out = tmp_path / "cmp"
    assert analyze.main([*paths, "--compare", "--task", "counting", "--samples", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "threshold (expert choice)" in printed and "argmax (token choice)" in printed
    rows = json.loads((out / "compare.json").read_text())
    assert [r["entropy_max"] for r in rows] == pytest.approx([math.log(2), math.log(3)])
    assert all(0 <= r["entropy_norm"] <= 1 and r["accuracy"] is not None for r in rows)
    assert set(rows[0]["by_kind"]) == {"symbol", "count", "separator", "end"}
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    with pytest.raises(SystemExit, match="--compare"):
        analyze.main([*paths, "--task", "counting"])


# ---- the corpus path and generation -----------------------------------------------------------
def test_train_on_a_corpus_and_generate_with_depths(tmp_path):
    text = " ".join(f"the value {i % 7} is stored in the list." for i in range(600))
    m = lab.build(router="expert", num_recursions=2, hidden_size=32, corpus=[text], vocab_size=300, max_len=64)
    first = lab.train(m, corpus=[text], steps=2, seq_len=32, batch_size=8, lr=1e-2, warmup_steps=1)
    metrics = lab.train(m, corpus=[text], steps=40, seq_len=32, batch_size=8, lr=1e-2, warmup_steps=5)
    assert metrics["val_loss"] < first["val_loss"] - 1.0 and "decision_agreement" in metrics
    g = lab.generate(m, "the value", max_tokens=5)
    assert len(g.depths) == len(g.token_ids) == 5 and all(1 <= d <= 2 for d in g.depths)
    ids = m.tokenizer.encode("the value") + g.token_ids
    ref = reference_forward(m.model, torch.tensor(ids))
    assert g.depths == ref.depths[len(ids) - 6:-1].tolist()           # depth of the producing position
    assert g.token_ids == ref.logits[len(ids) - 6:-1].argmax(-1).tolist()
    with pytest.raises(ValueError, match="exactly one"):
        lab.train(m, task="copy", corpus=[text])
    with pytest.raises(ValueError, match="task vocabulary"):
        lab.train(m, task="copy", steps=1)
    with pytest.raises(TypeError, match="unknown training setting"):
        lab.train(m, corpus=[text], steps=1, learning_rate=1.0)


# ---- every compute command takes --threads ----------------------------------------------------
@pytest.mark.parametrize("module", ["morserve.train.command", "morserve.train.analyze", "morserve.train.convert",
                                    "morserve.engine.cli", "morserve.api.server"])
def test_every_compute_command_has_a_threads_flag(module, capsys):
    import importlib
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert re.search(r"--threads THREADS\s+torch CPU threads \(default 1", capsys.readouterr().out)
