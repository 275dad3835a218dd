"""One steady-state decode tick of a 360M-class MoR model against its roofline bound.

B sequences with --context-token random prompts are prefilled; once every sequence is decoding, the
engine's ticks are timed (depth-wise batching: prologue over the fresh tokens, ONE shared-block
pass over every token in flight at mixed depths, epilogue + LM head + sampling for the tokens that
left the block). Reported per tick:
- wall time (host + device, each tick ends with the continue-mask / token copies to the host);
- the block pass alone, on the last tick's inputs, replayed from its CUDA graph and run eagerly
  (repeated runs, no host work between graph replays);
- with the multi-step decode loop (--loop-steps ticks per step, state on the device): wall time
  per tick, and one whole decode tick replayed alone from its CUDA graph (`device tick`);
- ideal bytes (every weight read once per phase run, every visible K/V entry once per layer; see
  benchmarks/engine_meter.py) and the roofline bound = ideal bytes / bandwidth (--bandwidth-gbs,
  2970 for the H100 SXM by default).

    python benchmarks/decode_tick.py --batch 256 --context 1024 --out runs/tick      # GPU
    python benchmarks/decode_tick.py --quick                                         # CPU, seconds
    python benchmarks/decode_tick.py --shape tiny --device cpu --dtype float32 --batch 256 --context 64
                                      # the engine's host cost per tick (the tiny model computes ~nothing)
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks.engine_meter import EngineMeter, greedy_params, synchronize  # noqa: E402
from benchmarks.mor_models import (PAPER_SPECS, QUICK_SHAPE, QUICK_SPECS, SMOLLM_360M_SHAPE,  # noqa: E402
                                   calibrate_router_bias, kv_bytes_per_entry, model_config, random_model,
                                   weight_bytes)
from morserve.engine import EngineArgs, LLMEngine  # noqa: E402
from morserve.engine.tick import KV_LEN  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model on CPU, a handful of ticks")
    p.add_argument("--shape", choices=("paper", "tiny"), default="paper",
                   help="the paper's 360M shape, or the tiny twin (host-overhead runs on a CPU)")
    p.add_argument("--model", default="mor-4", help="one of the paper configs (benchmarks/mor_models.py)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--ticks", type=int, default=40, help="decode ticks timed")
    p.add_argument("--repeats", type=int, default=20, help="runs of the isolated block pass / loop tick")
    p.add_argument("--loop-steps", type=int, default=8, help="ticks per step() of the decode loop")
    p.add_argument("--bandwidth-gbs", type=float, default=2970.0)
    p.add_argument("--init-gain", type=float, default=1.5)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for tick.md and tick.json")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.ticks, args.repeats, args.loop_steps = 16, 24, 8, 2, 4
        args.device, args.dtype, args.shape = "cpu", "float32", "tiny"
    return args


def build_engine(args: argparse.Namespace, eager: bool, steps: int) -> LLMEngine:
    shape, specs = (QUICK_SHAPE, QUICK_SPECS) if args.shape == "tiny" else (SMOLLM_360M_SHAPE, PAPER_SPECS)
    spec = next((s for s in specs if s.name == args.model), None)
    if spec is None:
        raise SystemExit(f"unknown model {args.model!r}; known: {[s.name for s in specs]}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    cfg = model_config(shape, spec)
    model = random_model(cfg, args.seed, args.init_gain / math.sqrt(cfg.hidden_size), device, dtype)
    if cfg.mor.router == "expert":
        gen = torch.Generator().manual_seed(args.seed + 1)
        calibrate_router_bias(model, torch.randint(0, cfg.vocab_size, (4, min(512, args.context)), generator=gen).to(device))
    # room for the timed ticks and the isolated replays of the decode-loop tick
    max_len = args.context + 4 * cfg.mor.num_recursions + args.ticks + args.repeats * steps + 16
    eargs = EngineArgs(model=model, max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.batch),
                       max_model_len=max_len, seed=args.seed, enforce_eager=eager, num_scheduler_steps=steps)
    return LLMEngine(model, None, eargs)


def steady_decode(engine: LLMEngine, args: argparse.Namespace) -> None:
    """Queue B long requests and step until every sequence decodes one token per tick."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    prompts = torch.randint(0, engine.model_config.vocab_size, (args.batch, args.context), generator=gen)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"tick-{i}", prompt, greedy_params(engine.max_model_len - args.context))
    while engine.num_waiting or any(not s.output_ids for s in engine.scheduler.running):
        engine.step()
    for _ in range(2 * engine.model_config.mor.num_recursions):     # let depths mix
        engine.step()


def time_block_pass(engine: LLMEngine, tokens: int, repeats: int, graph: bool) -> float:
    """Seconds per block pass on the last tick's static inputs (graph replay or eager call)."""
    graphed = engine.runner.graphed
    size = next(s for s in graphed.sizes if s >= tokens)
    run = graphed.graphs[size].replay if graph else \
        (lambda: graphed.block_pass(graphed.meta[:, :size], graphed.tables[:size]))
    with torch.inference_mode():
        run()
        synchronize(engine.runner.device)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(engine.runner.device)
    return (time.perf_counter() - start) / repeats


def time_loop_tick(engine: LLMEngine, repeats: int) -> float:
    """Seconds per decode-loop tick replayed alone (state keeps advancing; the engine is thrown
    away afterwards): a whole decode tick as one device program, no host work in between."""
    loop = engine.decode_loop
    graph = loop.graphs.get((loop.sampling, loop.rows))
    run = graph.replay if graph is not None else (lambda: loop._tick(loop.sampling, loop.rows))
    with torch.inference_mode():
        synchronize(engine.runner.device)
        start = time.perf_counter()
        for _ in range(repeats):
            loop.step.zero_()
            for _ in range(loop.max_steps):
                run()
        synchronize(engine.runner.device)
    return (time.perf_counter() - start) / (repeats * loop.max_steps)


def measure(args: argparse.Namespace, mode: str) -> dict:
    """mode: `graphs` (per-tick path, block pass from CUDA graphs), `eager`, or `loop` (the
    multi-step decode loop, --loop-steps ticks per step)."""
    steps = args.loop_steps if mode == "loop" else 1
    engine = build_engine(args, eager=mode == "eager", steps=steps)
    steady_decode(engine, args)
    meter = EngineMeter(engine)
    ticks: list = []
    engine.tick_listeners.append(ticks.append)
    block_tokens = []
    step = engine.runner.block_step
    engine.runner.block_step = lambda chunks: block_tokens.append(sum(c.num_active for c in chunks)) or step(chunks)
    in_loop = [0.0]     # seconds inside the decode loop's launch (eager ticks on a CPU) and collect
    if engine.decode_loop is not None:
        for name in ("launch", "collect"):
            method = getattr(engine.decode_loop, name)

            def timed(*a, _method=method, **kw):
                t0 = time.perf_counter()
                out = _method(*a, **kw)
                in_loop[0] += time.perf_counter() - t0
                return out
            setattr(engine.decode_loop, name, timed)
    synchronize(engine.runner.device)
    start = time.perf_counter()
    while len(ticks) < args.ticks:
        engine.step()
    synchronize(engine.runner.device)
    total = time.perf_counter() - start
    wall = total / len(ticks)
    runner, cfg = engine.runner, engine.model_config
    row = dict(mode=mode, batch=args.batch, context=args.context, tick_ms=1e3 * wall,
               tokens_per_s=sum(t.num_generated_tokens for t in ticks) / (wall * len(ticks)),
               block_tokens=sum(t.num_block_tokens for t in ticks) / len(ticks),
               tick_bytes=meter.bytes_read / len(ticks) if meter.bytes_read else None)
    if mode == "loop":
        row["host_ms"] = 1e3 * (total - in_loop[0]) / len(ticks)
        row["device_tick_ms"] = 1e3 * time_loop_tick(engine, args.repeats)
    elif runner.graphed is not None:     # the block pass alone, on the last tick's inputs
        t = block_tokens[-1]
        kv_entries = int(runner.graphed.meta[KV_LEN, :t].sum())
        layers = len(engine.model.block)
        block_bytes = weight_bytes([*engine.model.block]) + kv_entries * layers * kv_bytes_per_entry(cfg, runner.dtype)
        row.update(block_pass_tokens=t, block_bytes=block_bytes,
                   block_roofline_ms=1e3 * block_bytes / (args.bandwidth_gbs * 1e9),
                   block_graph_ms=1e3 * time_block_pass(engine, t, args.repeats, graph=runner.graphed.capture),
                   block_eager_ms=1e3 * time_block_pass(engine, t, args.repeats, graph=False))
    return row


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(rows: list[dict], args: argparse.Namespace, device: str) -> str:
    """One row per mode. The roofline of a tick is that of the per-tick path's ideal bytes (the
    loop does the same work per tick); `device tick` = the loop's tick replayed alone; `host` =
    the loop's wall time outside launching and collecting its ticks (load, page reservation,
    token handling, stop checks, outputs) per tick: with chained loops the device runs the next
    loop meanwhile, so on a GPU the tick costs about max(host, device tick)."""
    ideal = next((r["tick_bytes"] for r in rows if r.get("tick_bytes")), None)
    roofline = None if ideal is None else 1e3 * ideal / (args.bandwidth_gbs * 1e9)
    lines = [f"device: {device}; model {args.model}, B = {args.batch}, context {args.context}, "
             f"{args.ticks} ticks, decode loop {args.loop_steps} ticks per step, bandwidth {args.bandwidth_gbs:.0f} GB/s; "
             f"ideal bytes per tick {'n/a' if ideal is None else f'{ideal / 2**20:.1f} MiB'}, roofline {_ms(roofline)} ms\n",
             "| mode | tick ms (wall) | x roofline | host ms/tick | device tick ms | x roofline | out tok/s "
             "| block tokens/tick | block pass ms (graph / eager) | block pass roofline ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratio = lambda ms: "n/a" if ms is None or roofline is None else f"{ms / roofline:.2f}"
    for r in rows:
        device_ms = r.get("device_tick_ms")
        block = (f"{r['block_graph_ms']:.3f} / {r['block_eager_ms']:.3f} | {r['block_roofline_ms']:.3f}"
                 if "block_graph_ms" in r else "n/a | n/a")
        lines.append(f"| {r['mode']} | {r['tick_ms']:.3f} | {ratio(r['tick_ms'])} | {_ms(r.get('host_ms'))} | {_ms(device_ms)} | "
                     f"{ratio(device_ms)} | {r['tokens_per_s']:.0f} | {r['block_tokens']:.0f} | {block} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    rows = []
    for mode in ("graphs", "eager", "loop") if cuda else ("eager", "loop"):
        rows.append(measure(args, mode))
        gc.collect()                       # the next engine sizes its KV pool from free memory
        if cuda:
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    text = markdown(rows, args, device)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tick.md").write_text(text)
        (out / "tick.json").write_text(json.dumps(dict(device=device, args=vars(args), rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
