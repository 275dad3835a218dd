"""The decode loop's bookkeeping kernels (kernels/loop_state.py) vs their torch references on fresh
random row states: every output and every in-place update of the state must be equal.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET is set
before kernels.triton_ops is imported, by tests/test_kernels.py's set-up imported first).
"""

from __future__ import annotations

import os

import pytest
import torch

from test_kernels import DEVICE  # first: it sets TRITON_INTERPRET before kernels.triton_ops is imported
import kernels.reference as ref
import kernels.triton_ops as tri
from morserve.engine.tick import DEPTH, ENTRY, GROUP, KV_LEN, SLOT

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

STEPS, SCRATCH = 5, 99


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # shown by pytest when the test fails
    torch.manual_seed(seed)
    return seed


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty returns filled tensors (-7777, NaN), so an output element a kernel forgot to
    write shows up instead of happening to hold the right value."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7777)

    monkeypatch.setattr(torch, "empty", poisoned)


def _state(rows: int, nr: int, stages: int, block_depths: bool) -> dict[str, torch.Tensor]:
    """A random row state: depth 0..Nr (a tick's start) or, with block_depths, -Nr..Nr (between
    the passes of a depth-synchronous tick: rows that left are at -d)."""
    long = dict(dtype=torch.long, device=DEVICE)
    low = -nr if block_depths else 0
    return dict(live=torch.rand(rows, device=DEVICE) < 0.8,
                depth=torch.randint(low, nr + 1, (rows,), **long),
                slot=torch.randperm(rows + 20, device=DEVICE)[:rows],
                position=torch.randint(0, 300, (rows,), **long),
                target=torch.randint(1, nr + 1, (rows,), **long),
                lengths=torch.randint(0, 300, (rows, stages), **long),
                counts=torch.randint(0, 9, (STEPS, 2 * nr + 1), **long),
                step=torch.randint(0, STEPS, (1,), **long))


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of the state, with the per-step counts as the loop keeps them: views (occupancy,
    exits [steps, Nr], prologue_counts [steps]) of one packed [steps, 2 Nr + 1] tensor."""
    out = {name: t.clone() for name, t in state.items()}
    if "counts" in out:
        nr = (out["counts"].shape[1] - 1) // 2
        out["occupancy"], out["exits"], out["prologue_counts"] = out["counts"].split([nr, nr, 1], dim=1)
        out["prologue_counts"] = out["prologue_counts"].squeeze(1)
    return out


def _assert_equal(got, expected) -> None:
    if isinstance(got, dict):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
        return
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _entering(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-0 output buffers holding stale values (what the last tick left there)."""
    return (torch.randint(0, 50, (rows,), dtype=torch.long, device=DEVICE),
            torch.randint(0, 50, (rows,), dtype=torch.long, device=DEVICE),
            torch.randint(0, 50, (rows,), dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("rows", [1, 13, 40])
def test_loop_prologue_rows(rows: int) -> None:
    s = _state(rows, 3, 4, block_depths=False)
    got, expected = _entering(rows), _entering(rows)
    for op, out in ((tri.loop_prologue_rows, got), (ref.loop_prologue_rows, expected)):
        op(s["live"], s["depth"], s["slot"], s["position"], SCRATCH, *out)
    _assert_equal(got, expected)
    assert (expected[0] == SCRATCH).any() or rows == 1


@pytest.mark.parametrize("rows", [1, 13, 40])
@pytest.mark.parametrize("share_first", [False, True])
@pytest.mark.parametrize("enter, chosen", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("nr", [1, 3])
def test_loop_block_meta(rows: int, share_first: bool, enter: bool, chosen: bool, nr: int) -> None:
    stages = 2 if share_first else nr + 1
    state = _state(rows, nr, stages, block_depths=not enter)
    entered = torch.randint(1, nr + 1, (rows,), dtype=torch.long, device=DEVICE)
    metas, states = [], []
    for op in (tri.loop_block_meta, ref.loop_block_meta):
        s = _clone(state)
        metas.append(op(s["live"], s["depth"], s["slot"], s["position"], s["target"], s["lengths"],
                        entered.clone() if chosen else s["target"], s["prologue_counts"], s["occupancy"],
                        s["exits"], s["step"], SCRATCH, nr, share_first, enter=enter))
        states.append(s)
    assert metas[0].shape == (7, rows) and metas[0].dtype == torch.long
    assert torch.equal(metas[0], metas[1])
    _assert_equal(states[0], states[1])
    meta, s = metas[1], states[1]
    active = s["live"] & (s["depth"] >= 1)
    assert torch.equal(meta[KV_LEN] > 0, active) and torch.all(meta[SLOT][~active] == SCRATCH)
    assert torch.all(meta[ENTRY][~active] == -1) and torch.all(meta[DEPTH][~active] == nr)
    assert torch.all(meta[GROUP] // stages == torch.arange(rows, device=DEVICE))


@pytest.mark.parametrize("rows", [1, 13, 40])
@pytest.mark.parametrize("nr", [1, 4])
def test_loop_block_exit(rows: int, nr: int) -> None:
    state = _state(rows, nr, nr + 1, block_depths=True)
    cont = torch.rand(rows, device=DEVICE) < 0.5
    outs, states = [], []
    for op in (tri.loop_block_exit, ref.loop_block_exit):
        s = _clone(state)
        outs.append(op(s["live"], s["depth"], cont, s["slot"], s["position"], s["exits"], s["step"], nr, SCRATCH))
        states.append(s)
    _assert_equal(outs[0], outs[1])
    _assert_equal(states[0], states[1])


@pytest.mark.parametrize("rows", [1, 13, 40])
def test_loop_emit(rows: int) -> None:
    state = _state(rows, 3, 4, block_depths=True)
    new = torch.randint(0, 1000, (rows,), dtype=torch.long, device=DEVICE)
    logprob = -torch.rand(rows, device=DEVICE) * 5
    valid = torch.rand(rows, device=DEVICE) < 0.8
    width = rows + 3          # the loop's records are [steps, max_seqs] buffers, a tick writes rows of them
    records = dict(out_tokens=torch.randint(-1, 9, (STEPS, width), dtype=torch.long, device=DEVICE),
                   out_depths=torch.randint(0, 4, (STEPS, width), dtype=torch.long, device=DEVICE),
                   out_logprobs=torch.randn(STEPS, width, device=DEVICE))
    entering = _entering(rows)
    states = []
    for op in (tri.loop_emit, ref.loop_emit):
        s = _clone(state) | _clone(records) | dict(zip(("slots", "entries", "kv_lens"), (t.clone() for t in entering)))
        op(s["live"], s["depth"], s["slot"], s["position"], s["target"], new, logprob, valid,
           s["out_tokens"][:, :rows], s["out_depths"][:, :rows], s["out_logprobs"][:, :rows], s["step"], SCRATCH,
           s["slots"], s["entries"], s["kv_lens"])
        states.append(s)
    _assert_equal(states[0], states[1])
    s = states[1]
    assert int(s["step"]) == int(state["step"]) + 1 and torch.all(s["depth"] >= 0)
    # the next tick's prologue rows: exactly the live rows whose token was just sampled or was waiting
    assert torch.equal(s["kv_lens"] > 0, s["live"] & (s["depth"] == 0))


@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_loop_block_meta_follows_the_host_cache_stage_rule(kv_mode: str) -> None:
    """The kernel's SHARE_FIRST rule is CacheStages': per row of the pass, the group's stage is
    read_stage(d), the entry is the row's length at write_stage(d) (or -1), and only that length grows."""
    from engine_utils import tiny_model
    from morserve.engine.stages import CacheStages

    nr, rows = 4, 17
    stages = CacheStages(tiny_model("expert", kv_mode, nr).config)
    s = _clone(_state(rows, nr, stages.num_stages, block_depths=True))
    before = s["lengths"].clone()
    meta = tri.loop_block_meta(s["live"], s["depth"], s["slot"], s["position"], s["target"], s["lengths"],
                               s["target"], s["prologue_counts"], s["occupancy"], s["exits"], s["step"], SCRATCH, nr,
                               stages.share_first, enter=False)
    for row in range(rows):
        d, grown = int(s["depth"][row]), (s["lengths"][row] - before[row]).tolist()
        if not (s["live"][row] and d >= 1):
            assert int(meta[ENTRY, row]) == -1 and not any(grown)
            continue
        assert int(meta[GROUP, row]) == row * stages.num_stages + stages.read_stage(d)
        write = stages.write_stage(d)
        assert int(meta[ENTRY, row]) == (-1 if write is None else int(before[row, write]))
        assert grown == [int(stage == write) for stage in range(stages.num_stages)]
