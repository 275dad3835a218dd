"""Device kernel launches per decode tick and per generated token, counted on the CPU through the
public engine API (LLMEngine.add_request / step, tick listeners).

Counting rule: every non-view aten op dispatched while the engine steps counts as one launch
(TorchDispatchMode; ops whose every output aliases an input are views, and `empty*` allocations
launch nothing), and every `kernels.<op>` call counts as one launch, the aten ops inside it (its
CPU reference) not counted. On CUDA these are the kernels a tick enqueues (each Triton op is one
launch there, split-KV attention two).

Models: the 360M layer structure (vanilla-34: 34 layers; MoR-4: 1 + 8 shared x 4 + 1, expert
choice) at tiny widths (the count per layer does not depend on widths), random weights, float32,
B = 16 greedy sequences of 8-token prompts. After every sequence is decoding, launches and ticks
are counted over a window of engine steps, for the per-tick path (num_scheduler_steps = 1) and
the multi-step decode loop (num_scheduler_steps = --loop-steps; the window starts once a step
publishes a whole loop's ticks, i.e. loops are chained and each step launches one loop and
publishes the previous one). A tick is one published TickStats with work; launches per token =
launches / tokens generated in the window.

    python benchmarks/kernel_count.py                  # the table (and --json for one object per row)
    python benchmarks/kernel_count.py --top 12         # where the launches of a tick come from
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels  # noqa: E402
from benchmarks.mor_models import QUICK_SHAPE, ModelSpec, model_config, random_model  # noqa: E402
from morserve.engine import EngineArgs, LLMEngine, SamplingParams  # noqa: E402

SPECS = (ModelSpec("vanilla-34", 34, 1), ModelSpec("mor-4", 34, 4))
_NOT_LAUNCHES = ("empty", "empty_like", "empty_strided")


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class LaunchCounter(TorchDispatchMode):
    """Counts launches by name ("aten.<op>" or "kernels.<op>") while active and not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.inside_kernel = 0
        self.enabled = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.enabled and not self.inside_kernel and not _is_view(func) \
                and func.overloadpacket.__name__ not in _NOT_LAUNCHES:
            self.counts[f"aten.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))

    def wrap_kernels(self) -> list[tuple[str, object]]:
        """Replace every kernels.<op> by a counting wrapper; returns what to restore."""
        saved = []
        for name in kernels.__all__:
            op = getattr(kernels, name)
            saved.append((name, op))

            @functools.wraps(op)
            def counted(*args, _op=op, _name=name, **kwargs):
                if self.enabled and not self.inside_kernel:
                    self.counts[f"kernels.{_name}"] += 1
                self.inside_kernel += 1
                try:
                    return _op(*args, **kwargs)
                finally:
                    self.inside_kernel -= 1
            setattr(kernels, name, counted)
        return saved


@dataclass
class Count:
    model: str
    driver: str
    ticks: int
    tokens: int
    launches: int
    breakdown: collections.Counter

    @property
    def per_tick(self) -> float:
        return self.launches / max(self.ticks, 1)

    @property
    def per_token(self) -> float:
        return self.launches / max(self.tokens, 1)


def count(spec: ModelSpec, loop_steps: int, batch: int = 16, window: int = 32, shape: dict | None = None,
          prompt_len: int = 8, seed: int = 0) -> Count:
    """Launches over `window` ticks (rounded up to whole engine steps) of steady decoding."""
    cfg = model_config(shape or QUICK_SHAPE, spec)
    model = random_model(cfg, seed, std=0.02, device=torch.device("cpu"), dtype=torch.float32)
    engine = LLMEngine(model, None, EngineArgs(model=model, max_num_seqs=batch, num_scheduler_steps=loop_steps,
                                               device="cpu", dtype="float32"))
    ticks, tokens, decoding = [0], [0], [False]

    def on_tick(stats) -> None:
        if stats.num_block_tokens or stats.num_prologue_tokens or stats.num_epilogue_tokens:
            ticks[0] += 1
            tokens[0] += stats.num_generated_tokens
            decoding[0] = stats.num_waiting == 0 and stats.num_prologue_tokens <= batch
    engine.tick_listeners.append(on_tick)
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=4 * window + 64, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(1, cfg.vocab_size, (prompt_len,), generator=gen).tolist(), params)
    counter = LaunchCounter()
    saved = counter.wrap_kernels()
    try:
        with counter:
            while not decoding[0]:
                engine.step()                                   # prefill
            for _ in range(2 * cfg.mor.num_recursions):
                engine.step()                                   # every depth of the block occupied
            if loop_steps > 1:       # until loops are chained: each step launches one, publishes one
                before = ticks[0]
                while ticks[0] - before < loop_steps:
                    before = ticks[0]
                    engine.step()
            ticks[0] = tokens[0] = 0
            counter.enabled = True
            while ticks[0] < window:
                engine.step()
            counter.enabled = False
    finally:
        for name, op in saved:
            setattr(kernels, name, op)
    driver = "per-tick" if loop_steps == 1 else f"decode loop ({loop_steps})"
    return Count(spec.name, driver, ticks[0], tokens[0], sum(counter.counts.values()), counter.counts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--window", type=int, default=32, help="ticks counted per row")
    p.add_argument("--loop-steps", type=int, default=8, help="num_scheduler_steps of the decode-loop rows")
    p.add_argument("--top", type=int, default=0, help="print the N largest sources of launches per tick")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    print(f"{'model':<11} {'driver':<17} {'ticks':>5} {'tokens':>6} {'launches/tick':>13} {'launches/token':>14}")
    for spec in SPECS:
        for steps in (1, args.loop_steps):
            c = count(spec, steps, args.batch, args.window)
            if args.json:
                print(json.dumps(dict(model=c.model, driver=c.driver, ticks=c.ticks, tokens=c.tokens,
                                      per_tick=c.per_tick, per_token=c.per_token)))
            print(f"{c.model:<11} {c.driver:<17} {c.ticks:>5} {c.tokens:>6} {c.per_tick:>13.1f} {c.per_token:>14.2f}",
                  flush=True)
            if args.top:
                for name, n in c.breakdown.most_common(args.top):
                    print(f"{'':<11} {n / c.ticks:>8.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
