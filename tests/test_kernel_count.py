"""benchmarks/kernel_count.py on tiny configurations: the launch count of a decode tick grows by a
fixed number per layer (4 GEMMs, 2 norms, RoPE + K/V store, attention, silu * up) and does not
depend on the model's widths, for both drivers."""

from __future__ import annotations

import pytest

from benchmarks.kernel_count import count
from benchmarks.mor_models import QUICK_SHAPE, ModelSpec

LAUNCHES_PER_LAYER = 9
NARROW = dict(QUICK_SHAPE, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("loop_steps", [1, 3])
def test_launches_per_layer_and_width_independence(loop_steps: int) -> None:
    small = count(ModelSpec("vanilla-4", 4, 1), loop_steps, batch=3, window=3)
    large = count(ModelSpec("vanilla-6", 6, 1), loop_steps, batch=3, window=3)
    narrow = count(ModelSpec("vanilla-4", 4, 1), loop_steps, batch=3, window=3, shape=NARROW)
    assert small.ticks >= 3 and small.tokens > 0
    assert large.per_tick - small.per_tick == pytest.approx(2 * LAUNCHES_PER_LAYER)
    assert narrow.per_tick == pytest.approx(small.per_tick)
    assert small.breakdown["kernels.paged_attention"] == 4 * small.ticks       # one launch per layer


def test_mor_tick_counts_every_phase() -> None:
    c = count(ModelSpec("mor-2", 6, 2), 1, batch=3, window=4)
    # one block pass (2 layers) every tick; the prologue and epilogue layer when a token enters / leaves
    assert 2 * c.ticks < c.breakdown["kernels.paged_attention"] <= 4 * c.ticks
    assert c.breakdown["kernels.store_kv_rope"] == c.breakdown["kernels.paged_attention"]
    # the phases' own work is fused: each block pass ends in one row update, the routers' GEMM and one
    # decision kernel; no per-phase metadata op (slot mapping, RoPE rows, per-depth counts, router
    # math) is left. Aten ops beyond the GEMMs: the per-tick host's metadata uploads and depth-cap
    # writes (detach_, index_copy_), the stage-0 kv_lens (add) and the logit-row select.
    assert c.breakdown["kernels.update_expert"] == c.breakdown["kernels.expert_decide"] == c.ticks
    aten = {name for name in c.breakdown if name.startswith("aten.")}
    gemms = {"aten.linear", "aten._linear_pointwise", "aten.matmul"}     # _linear_pointwise: oneDNN, fp32 CPU
    assert aten <= gemms | {"aten.detach_", "aten.index_copy_", "aten.add", "aten.index_select"}
