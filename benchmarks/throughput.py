"""Offline decode throughput of MoR vs vanilla Transformers (the MoR paper's throughput question).

Workload (the paper's): a queue of N requests (default 1000) all waiting at t = 0, output lengths
drawn from a normal distribution (mean 256, clipped to >= 1), EOS ignored, greedy decoding. The
prompt is one token (or --prompt-len tokens) drawn at random per request: with random weights and
greedy decoding, one shared BOS prompt would make every request the same token stream, in lock-step.

Models: the paper's 360M scale (SmolLM-360M shape) with random weights, std = --init-gain /
sqrt(hidden) (1.5 keeps greedy continuations diverse; at HF's 0.02 they repeat one token), and
expert-choice routers calibrated so that recursion r takes the capacity (Nr - r + 1) / Nr of the
tokens (benchmarks/mor_models.py); or a real checkpoint (--model PATH) beside a random vanilla twin
of the same shape.

Modes: vanilla Transformer with continuous sequence-wise batching; MoR with depth-synchronous
batching; MoR with continuous depth-wise batching; Hugging Face `generate` on the targets' vanilla
baseline (when transformers is importable). Batch settings (max_num_seqs): `fixed` (--batch, 32);
`relative` (the paper's relative maximum: --batch x the vanilla model's KV bytes per sequence / this
model's); `memory` (the largest batch whose KV fits --kv-memory-gb, capped at N).

    python benchmarks/throughput.py --quick                    # tiny models on CPU, < 1 minute
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --out runs/throughput
Writes OUT/throughput.md and OUT/throughput.json (rewritten after every run), then OUT/throughput.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.engine_meter import RunResult, run_workload, synchronize  # noqa: E402
from benchmarks.hf_peer import hf_available, run_hf_generate, to_hf_llama  # noqa: E402
from benchmarks.mor_models import (PAPER_SPECS, QUICK_SHAPE, QUICK_SPECS, SMOLLM_360M_SHAPE, ModelSpec,  # noqa: E402
                                   calibrate_router_bias, expected_kv_bytes_per_token, model_config,
                                   random_model)
from benchmarks.throughput_report import SETTINGS, Row, markdown, plot, target_checks, write_json  # noqa: E402
from morserve.config import ModelConfig  # noqa: E402
from morserve.engine import EngineArgs, LLMEngine  # noqa: E402
from morserve.model import MoRModel, reference_forward  # noqa: E402

Request = tuple[list[int], int]          # (prompt token ids, output tokens)
QUICK = dict(num_requests=12, output_mean=8.0, output_std=2.0, batch=4, block_size=4, kv_memory_gb=0.0002,
             calib_tokens=2048, hf_requests=8, dtype="float32", device="cpu")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and workload on CPU (< 1 minute)")
    p.add_argument("--model", default=None, help="a real checkpoint (path or known name) instead of the paper configs")
    p.add_argument("--models", default=None, help="comma-separated subset of the paper models (default: all)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated batch settings")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--output-mean", type=float, default=256.0)
    p.add_argument("--output-std", type=float, default=64.0)
    p.add_argument("--prompt-len", type=int, default=1, help="prompt tokens per request (the paper: 1)")
    p.add_argument("--batch", type=int, default=32, help="the fixed batch size")
    p.add_argument("--kv-memory-gb", type=float, default=None,
                   help="KV budget for the `memory` setting (default: 90%% of free GPU memory - 2 GiB; CPU: 1 GiB)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--init-gain", type=float, default=1.5, help="random weights ~ N(0, (gain / sqrt(hidden))^2)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="random tokens the routers are calibrated on")
    p.add_argument("--hf-requests", type=int, default=64, help="requests HF generate runs (it is slow)")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="engine ticks per step() for greedy decoding (the device decode loop); > 1 gives "
                        "end-to-end figures only (no per-phase times or roofline)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the roofline "
                   "(default: measured with a device copy)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for everything: each run gets an equal share of what is left, a run past its "
                        "share stops early and is marked partial")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(_REPO / "runs" / "throughput"))
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    return args


# ---- workload --------------------------------------------------------------------------------
def make_workload(num: int, mean: float, std: float, prompt_len: int, vocab: int, max_len: int,
                  seed: int) -> list[Request]:
    """Random prompts of `prompt_len` tokens; output lengths ~ N(mean, std), clipped to [1, max_len - prompt_len]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(num, generator=gen) * std + mean).round().clamp(1, max_len - prompt_len).long()
    prompts = torch.randint(0, vocab, (num, prompt_len), generator=gen)
    return [(p.tolist(), int(n)) for p, n in zip(prompts, lengths)]


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy (bytes read + written)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    reps = 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    return 2 * n * reps / (time.perf_counter() - start)


def default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9) - (2 << 30)
    return 1 << 30


# ---- plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    spec: ModelSpec
    mode: str
    setting: str
    batch: int


def memory_max_batch(cfg: ModelConfig, dtype: torch.dtype, kv_budget: int, seq_tokens: float) -> int:
    """The most sequences of `seq_tokens` tokens whose expected KV fits the budget."""
    return max(1, int(kv_budget // (expected_kv_bytes_per_token(cfg, dtype) * seq_tokens)))


def batch_sizes(cfg: ModelConfig, base_cfg: ModelConfig, dtype: torch.dtype, fixed: int, kv_budget: int,
                seq_tokens: float, num_requests: int) -> dict[str, int]:
    """max_num_seqs per setting: fixed; the paper's relative max (fixed x the baseline's KV bytes
    per sequence / this model's); the memory max, capped at the number of requests."""
    relative = round(fixed * expected_kv_bytes_per_token(base_cfg, dtype) / expected_kv_bytes_per_token(cfg, dtype))
    return {"fixed": fixed, "relative": max(1, relative),
            "memory": min(num_requests, memory_max_batch(cfg, dtype, kv_budget, seq_tokens))}


def target_pair(specs: list[ModelSpec]) -> tuple[ModelSpec | None, str]:
    """The MoR model the targets are about (most recursions) and its vanilla baseline's name."""
    mor = max((s for s in specs if not s.is_vanilla), key=lambda s: s.num_recursions, default=None)
    if mor is not None:
        return mor, mor.baseline
    return None, next(s.name for s in specs)


def plan_runs(specs: list[ModelSpec], settings: list[str], sizes: dict[str, dict[str, int]],
              hf_model: str | None) -> list[Planned]:
    """Engine runs per model (vanilla: sequence-wise; MoR: depth-wise and depth-sync) per setting,
    and HF generate at the fixed batch on `hf_model` (the targets' vanilla baseline) if given."""
    runs = []
    for spec in specs:
        modes = ["seq-wise"] if spec.is_vanilla else ["depth-wise", "depth-sync"]
        runs += [Planned(spec, mode, s, sizes[spec.name][s]) for s in settings for mode in modes]
        if spec.name == hf_model and "fixed" in settings:
            runs.append(Planned(spec, "hf-generate", "fixed", sizes[spec.name]["fixed"]))
    return runs


class Budget:
    """Splits the remaining wall-clock budget evenly over the runs still to do (each gets at least
    MIN_RUN_SECONDS while that much is left, so the runs planned first are never the ones dropped)."""

    MIN_RUN_SECONDS = 2.0

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + seconds

    def share(self, runs_left: int) -> float | None:
        """Seconds for the next run (None: unlimited)."""
        if self.end is None:
            return None
        return max(self.MIN_RUN_SECONDS, (self.end - time.perf_counter()) / max(1, runs_left))

    def exhausted(self) -> bool:
        return self.end is not None and self.end - time.perf_counter() < self.MIN_RUN_SECONDS


# ---- models ----------------------------------------------------------------------------------
def shape_of(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


def load_models(args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> tuple[list[ModelSpec], dict[str, ModelConfig], MoRModel | None]:
    """(specs, their configs, the loaded checkpoint or None). With --model: the checkpoint and a
    vanilla twin of its shape; otherwise the paper (or quick) configurations."""
    if args.model is None:
        shape, specs = (QUICK_SHAPE, QUICK_SPECS) if args.quick else (SMOLLM_360M_SHAPE, PAPER_SPECS)
        if args.models:
            wanted = args.models.split(",")
            unknown = set(wanted) - {s.name for s in specs}
            if unknown:
                raise SystemExit(f"unknown model(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
            specs = tuple(s for s in specs if s.name in wanted)
        return list(specs), {s.name: model_config(shape, s) for s in specs}, None
    from morserve.checkpoint import load_pretrained

    loaded = load_pretrained(args.model, device=device, dtype=dtype).model
    cfg = loaded.config
    spec = ModelSpec(Path(str(args.model)).name, cfg.num_hidden_layers, cfg.mor.num_recursions)
    twin = ModelSpec(spec.baseline, cfg.num_hidden_layers, 1)
    specs = [twin] if spec.is_vanilla else [twin, spec]
    configs = {twin.name: model_config(shape_of(cfg), twin), spec.name: cfg}
    return specs, configs, loaded


def prepare_model(spec: ModelSpec, cfg: ModelConfig, loaded: MoRModel | None, args: argparse.Namespace,
                  device: torch.device, dtype: torch.dtype, seq_len: int) -> tuple[MoRModel, dict]:
    """The model to benchmark and what its routing calibration found (random MoR models only)."""
    if loaded is not None and loaded.config is cfg:
        return loaded, {"routers": "trained (not calibrated)"}
    model = random_model(cfg, args.seed, args.init_gain / math.sqrt(cfg.hidden_size), device, dtype)
    if cfg.mor.router != "expert":
        return model, {}
    rows = max(1, math.ceil(args.calib_tokens / seq_len))
    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = torch.randint(0, cfg.vocab_size, (rows, seq_len), generator=gen).to(device)
    held_out = torch.randint(0, cfg.vocab_size, (rows, seq_len), generator=gen).to(device)
    bias = calibrate_router_bias(model, calib)
    with torch.inference_mode():
        fresh = reference_forward(model, held_out)
    held = [float(s.float().mean()) for s in fresh.selected] + [0.0] * (cfg.mor.num_recursions - len(fresh.selected))
    return model, {"router_bias": fmt_list(bias), "target fractions": fmt_list(cfg.mor.capacities),
                   "held-out sample fractions": fmt_list(held)}


def fmt_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


# ---- runs ------------------------------------------------------------------------------------
def engine_for(model: MoRModel, mode: str, batch: int, args: argparse.Namespace, kv_budget: int | None,
               max_len: int) -> LLMEngine:
    """An engine for one run. KV pool: `kv_budget` bytes (the memory setting), else the engine's
    default (most of the free GPU memory, 1 GiB on CPU); either way capped at what `batch`
    sequences of `max_len` tokens could use, so only the memory setting is limited by KV."""
    eargs = EngineArgs(model=model, batching="vanilla" if mode == "depth-sync" else "depthwise",
                       max_num_seqs=batch, max_num_batched_tokens=max(args.max_num_batched_tokens, batch),
                       kv_cache_memory=kv_budget, block_size=args.block_size, seed=args.seed,
                       max_model_len=max_len, num_scheduler_steps=args.num_scheduler_steps)
    return LLMEngine(model, None, eargs)


def warm_up(model: MoRModel, mode: str, args: argparse.Namespace, max_len: int, prompt_len: int) -> None:
    """A few ticks of the same mode first (CUDA/Triton compilation and allocator warm-up)."""
    engine = engine_for(model, mode, 2, args, None, max_len)
    run_workload(engine, [([1] * prompt_len, 4), ([2] * prompt_len, 3)])


def engine_row(spec: ModelSpec, planned: Planned, result: RunResult, num_requests: int, bandwidth: float) -> Row:
    return Row(model=spec.name, baseline=spec.baseline, mode=planned.mode, setting=planned.setting,
               batch=planned.batch, requests=num_requests, finished=result.finished_requests,
               output_tokens=result.output_tokens, seconds=result.seconds, block_seconds=result.block_seconds,
               prologue_seconds=result.prologue_seconds, epilogue_seconds=result.epilogue_seconds, ticks=result.ticks,
               peak_memory=result.peak_memory, kv_bytes_per_token=result.kv_bytes_per_token,
               roofline=result.bytes_read / result.seconds / bandwidth if result.seconds and result.bytes_read else None,
               depth_fractions=result.depth_fractions, preemptions=result.preemptions, partial=result.partial)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def run_engine(model: MoRModel, planned: Planned, workload: list[Request], args: argparse.Namespace,
               kv_budget: int | None, max_len: int, time_cap: float | None) -> RunResult:
    """One timed engine run of the whole workload (a fresh engine, so nothing carries over)."""
    engine = engine_for(model, planned.mode, planned.batch, args, kv_budget, max_len)
    with tqdm(total=len(workload), desc=f"{planned.spec.name} {planned.mode} B={planned.batch}", leave=False,
              mininterval=2.0) as bar:
        return run_workload(engine, workload, time_cap, bar.update)


def run_hf(model: MoRModel, planned: Planned, workload: list[Request], args: argparse.Namespace,
           time_cap: float | None) -> Row:
    """HF generate on the first --hf-requests requests, after a short warm-up batch."""
    hf = to_hf_llama(model)
    subset = workload[: args.hf_requests]
    run_hf_generate(hf, [(p, 2) for p, _ in subset[: planned.batch]], planned.batch)
    res = run_hf_generate(hf, subset, planned.batch, time_cap)
    return Row(model=planned.spec.name, baseline=planned.spec.baseline, mode="hf-generate", setting=planned.setting,
               batch=planned.batch, requests=len(subset), finished=res.finished_requests,
               output_tokens=res.output_tokens, seconds=res.seconds, peak_memory=res.peak_memory, partial=res.partial)


def workload_text(args: argparse.Namespace, workload: list[Request]) -> str:
    return (f"{len(workload)} requests queued at t = 0, prompt {args.prompt_len} random token(s), output ~ "
            f"N({args.output_mean:g}, {args.output_std:g}) clipped to >= 1 ({sum(n for _, n in workload)} tokens), "
            "greedy, EOS ignored")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.time_budget)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = EngineArgs(dtype=args.dtype).resolve_dtype(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs, configs, loaded = load_models(args, device, dtype)
    vocab, max_len = configs[specs[0].name].vocab_size, configs[specs[0].name].max_position_embeddings
    workload = make_workload(args.num_requests, args.output_mean, args.output_std, args.prompt_len, vocab, max_len,
                             args.seed)
    run_len = args.prompt_len + max(n for _, n in workload)
    seq_tokens = args.prompt_len + sum(n for _, n in workload) / len(workload)
    kv_budget = int(args.kv_memory_gb * 2**30) if args.kv_memory_gb is not None else default_kv_budget(device)
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth(device)
    settings = [s for s in args.settings.split(",") if s]
    sizes = {s.name: batch_sizes(configs[s.name], configs[s.baseline], dtype, args.batch, kv_budget, seq_tokens,
                                 len(workload)) for s in specs}
    target, target_base = target_pair(specs)
    plan = plan_runs(specs, settings, sizes, target_base if hf_available() else None)

    command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"date": datetime.date.today().isoformat(), "device": describe_device(device), "dtype": str(dtype),
            "command": f"`python benchmarks/throughput.py {command}`", "workload": workload_text(args, workload),
            "batch sizes": "; ".join(
                f"{name}: " + ", ".join(f"{k} {v}" for k, v in b.items())
                + f" (KV budget fits {memory_max_batch(configs[name], dtype, kv_budget, seq_tokens)})"
                for name, b in sizes.items()),
            "KV budget (memory setting)": f"{kv_budget / 2**20:.1f} MiB",
            "engine ticks per step (decode loop)": str(args.num_scheduler_steps),
            "bandwidth (roofline)": f"{bandwidth / 1e9:.0f} GB/s" + ("" if args.bandwidth_gbs else " (measured copy)"),
            "HF generate": (f"{target_base}, first {args.hf_requests} requests" if hf_available()
                            else "skipped: transformers is not importable here")}
    rows: list[Row] = []
    skipped: list[str] = []

    def write() -> None:
        checks = target_checks(rows, target.name, target_base, target.num_recursions) if target else []
        if skipped:
            meta["skipped (time budget)"] = ", ".join(skipped)
        (out / "throughput.md").write_text(markdown(meta, rows, checks, on_target_device=device.type == "cuda"))
        write_json(out / "throughput.json", meta, rows)

    measured: dict[tuple[str, str, int], Row] = {}
    bar = tqdm(total=len(plan), desc="runs", mininterval=2.0)
    for spec in specs:
        runs = [p for p in plan if p.spec == spec]
        model, calibration = prepare_model(spec, configs[spec.name], loaded, args, device, dtype,
                                           min(max_len, round(seq_tokens)))
        if calibration:
            meta[f"routing {spec.name}"] = "; ".join(f"{k} {v}" for k, v in calibration.items())
            tqdm.write(f"{spec.name} routing: {meta[f'routing {spec.name}']}")
        warmed: set[str] = set()
        for planned in runs:
            left = len(plan) - bar.n
            key = (spec.name, planned.mode, planned.batch)
            if key in measured:
                prior = measured[key]
                rows.append(Row(**{**prior.__dict__, "setting": planned.setting, "reused_from": prior.setting}))
            elif budget.exhausted():
                skipped.append(f"{spec.name} {planned.mode} {planned.setting}")
                bar.update(1)
                continue
            elif planned.mode == "hf-generate":
                rows.append(run_hf(model, planned, workload, args, budget.share(left)))
            else:
                if planned.mode not in warmed:
                    warm_up(model, planned.mode, args, run_len, args.prompt_len)
                    warmed.add(planned.mode)
                result = run_engine(model, planned, workload, args, kv_budget if planned.setting == "memory" else None,
                                    run_len, budget.share(left))
                rows.append(engine_row(spec, planned, result, len(workload), bandwidth))
                measured[key] = rows[-1]
            free_memory(device)
            r = rows[-1]
            tqdm.write(f"{r.model:>11} {r.mode:<11} {r.setting:<8} B={r.batch:<5} {r.tokens_per_second:9.0f} tok/s"
                       + (" (partial)" if r.partial else ""))
            write()
            bar.update(1)
        del model
        free_memory(device)
    bar.close()
    write()
    plot(out / "throughput.png", rows, f"decode throughput, {meta['device']}, {meta['dtype']}")
    print((out / "throughput.md").read_text())
    print(f"wrote {out / 'throughput.md'}, {out / 'throughput.json'}, {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
