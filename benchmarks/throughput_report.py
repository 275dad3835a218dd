"""Rows, speed-up ratios, the target checks, the markdown report and the plot of the throughput
benchmark (benchmarks/throughput.py). Pure functions of the measured rows."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MODES = ("seq-wise", "depth-sync", "depth-wise", "hf-generate")
MODE_TEXT = {"seq-wise": "vanilla Transformer, continuous sequence-wise batching",
             "depth-sync": "MoR, depth-synchronous batching (recursions 1..Nr in order each step)",
             "depth-wise": "MoR, continuous depth-wise batching",
             "hf-generate": "Hugging Face transformers generate (static batches)"}
SETTINGS = ("fixed", "relative", "memory")
KV_LABELS = {"all": "whole model, pages occupied", "block": "shared-block layers, pages occupied",
             "entries_all": "whole model, entries (no page round-up)",
             "entries_block": "shared-block layers, entries (no page round-up)"}


@dataclass
class Row:
    """One measured (model, mode, batch setting). Times in seconds, memory in bytes."""

    model: str
    baseline: str
    mode: str
    setting: str
    batch: int
    requests: int
    finished: int
    output_tokens: int
    seconds: float
    block_seconds: float | None = None
    prologue_seconds: float | None = None
    epilogue_seconds: float | None = None
    ticks: int | None = None
    peak_memory: int | None = None
    kv_bytes_per_token: dict[str, float] | None = None   # see EngineMeter.kv_per_token
    roofline: float | None = None
    depth_fractions: list[float] | None = None
    preemptions: int | None = None
    partial: bool = False
    reused_from: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def block_tokens_per_second(self) -> float | None:
        if not self.block_seconds:
            return None
        return self.output_tokens / self.block_seconds


def find(rows: list[Row], model: str, mode: str, setting: str) -> Row | None:
    return next((r for r in rows if (r.model, r.mode, r.setting) == (model, mode, setting)), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def speedups(rows: list[Row], row: Row) -> dict[str, float | None]:
    """End-to-end and block-only speed-up over the vanilla baseline at the same batch setting,
    and (depth-wise rows) over depth-synchronous batching of the same model."""
    base = find(rows, row.baseline, "seq-wise", row.setting)
    sync = find(rows, row.model, "depth-sync", row.setting) if row.mode == "depth-wise" else None
    return {"vs_vanilla": ratio(row.tokens_per_second, base.tokens_per_second) if base else None,
            "vs_vanilla_block": ratio(row.block_tokens_per_second, base.block_tokens_per_second) if base else None,
            "vs_sync": ratio(row.tokens_per_second, sync.tokens_per_second) if sync else None}


# ---- targets ---------------------------------------------------------------------------------
@dataclass
class Check:
    what: str
    measured: float | None
    goal: str
    met: bool | None


def target_checks(rows: list[Row], mor: str, vanilla: str, num_recursions: int) -> list[Check]:
    """The project's throughput targets for model `mor` against `vanilla` (None where unmeasured)."""
    def tps(model: str, mode: str, setting: str) -> float | None:
        row = find(rows, model, mode, setting)
        return row.tokens_per_second if row else None

    checks = []
    for setting, goal in (("relative", 2.5), ("fixed", 1.5)):
        value = ratio(tps(mor, "depth-wise", setting), tps(vanilla, "seq-wise", setting))
        checks.append(Check(f"{mor} depth-wise vs {vanilla} sequence-wise, {setting} batch (end to end)",
                            value, f">= {goal}x", None if value is None else value >= goal))
    for setting in SETTINGS:
        value = ratio(tps(mor, "depth-wise", setting), tps(mor, "depth-sync", setting))
        if value is not None:
            checks.append(Check(f"{mor} depth-wise vs depth-synchronous, {setting} batch", value, ">= 1.3x",
                                value >= 1.3))
    bound = (num_recursions + 1) / (2 * num_recursions)
    mor_row, van_row = find(rows, mor, "depth-wise", "fixed"), find(rows, vanilla, "seq-wise", "fixed")
    if mor_row and van_row and mor_row.kv_bytes_per_token and van_row.kv_bytes_per_token:
        for key, label in KV_LABELS.items():
            value = ratio(mor_row.kv_bytes_per_token[key], van_row.kv_bytes_per_token[key])
            checks.append(Check(f"KV bytes/token {mor} / {vanilla}, {label}", value, f"<= {bound:.3f}",
                                None if value is None else value <= bound))
    value = ratio(tps(vanilla, "seq-wise", "fixed"), tps(vanilla, "hf-generate", "fixed"))
    checks.append(Check(f"{vanilla} ours (sequence-wise) vs HF generate, fixed batch", value, ">= 10x",
                        None if value is None else value >= 10))
    return checks


# ---- rendering -------------------------------------------------------------------------------
def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


TABLE_HEADER = ("| model | mode | batch | B | done | out tok | s | tok/s | block-only tok/s | time % pro/block/epi "
                "| x vanilla | x vanilla (block) | x depth-sync | peak mem MiB | KV B/tok (all / block) "
                "| roofline % | depth fractions | preempt |\n"
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")


def table_row(rows: list[Row], r: Row) -> str:
    s = speedups(rows, r)
    done = f"{r.finished}/{r.requests}" + (" (partial)" if r.partial else "")
    setting = r.setting + (f" (= {r.reused_from})" if r.reused_from else "")
    split = ("n/a" if not (r.block_seconds and r.seconds) else
             "/".join(f"{100 * t / r.seconds:.0f}" for t in (r.prologue_seconds, r.block_seconds, r.epilogue_seconds)))
    kv = ("n/a" if not r.kv_bytes_per_token
          else f"{r.kv_bytes_per_token['all']:.0f} / {r.kv_bytes_per_token['block']:.0f}")
    fracs = "n/a" if not r.depth_fractions else " ".join(f"{f:.2f}" for f in r.depth_fractions)
    cells = [r.model, r.mode, setting, str(r.batch), done, str(r.output_tokens), f"{r.seconds:.2f}",
             f"{r.tokens_per_second:.0f}", _num(r.block_tokens_per_second, "{:.0f}"), split,
             _num(s["vs_vanilla"]), _num(s["vs_vanilla_block"]), _num(s["vs_sync"]), _mib(r.peak_memory), kv,
             _num(None if r.roofline is None else 100 * r.roofline, "{:.1f}"), fracs,
             "n/a" if r.preemptions is None else str(r.preemptions)]
    return "| " + " | ".join(cells) + " |"


def checks_table(checks: list[Check], on_target_device: bool) -> str:
    status = {True: "met", False: "NOT met", None: "not measured"}
    lines = ["| check | measured | goal | status |", "|---|---:|---|---|"]
    for c in checks:
        state = status[c.met] if on_target_device else "CPU figure (targets are for the H100)"
        lines.append(f"| {c.what} | {_num(c.measured, '{:.3f}')} | {c.goal} | {state} |")
    return "\n".join(lines)


def markdown(meta: dict, rows: list[Row], checks: list[Check], on_target_device: bool) -> str:
    lines = ["# Throughput benchmark", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "Modes: " + "; ".join(f"`{m}` = {MODE_TEXT[m]}" for m in MODES) + ".", "",
              "Columns: `tok/s` = output tokens / wall time of the whole run (everything counted); "
              "`block-only tok/s` = output tokens / time inside the shared-block steps only (the figure "
              "comparable to the paper's); `x vanilla` = speed-up over the vanilla model with the same layer "
              "count at the same batch setting; `KV B/tok` = KV pages used x page bytes / tokens cached, "
              "averaged over ticks (all layers / shared-block layers only); `roofline %` = ideal bytes read "
              "(weights once per call + each visible K/V entry once per layer) / wall time / bandwidth; "
              "`time %` = share of the wall time inside prologue / shared-block / epilogue calls (the rest: "
              "scheduling, sampling, bookkeeping); "
              "`depth fractions` = measured share of tokens taking recursion 1..Nr.", "",
              TABLE_HEADER]
    lines += [table_row(rows, r) for r in rows]
    lines += ["", "## Targets", "", checks_table(checks, on_target_device), ""]
    return "\n".join(lines)


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    data = {"meta": meta, "rows": [{**asdict(r), "tokens_per_second": r.tokens_per_second,
                                    "block_tokens_per_second": r.block_tokens_per_second,
                                    **speedups(rows, r)} for r in rows]}
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot(path: Path, rows: list[Row], title: str) -> None:
    """Throughput vs batch size, one line per (model, mode); end to end and block-only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        series.setdefault((r.model, r.mode), []).append(r)
    for (model, mode), rs in series.items():
        rs = sorted({r.batch: r for r in rs}.values(), key=lambda r: r.batch)
        style = {"seq-wise": "-o", "depth-sync": "--s", "depth-wise": "-^", "hf-generate": ":x"}[mode]
        axes[0].plot([r.batch for r in rs], [r.tokens_per_second for r in rs], style, label=f"{model} {mode}")
        block = [(r.batch, r.block_tokens_per_second) for r in rs if r.block_tokens_per_second]
        if block:
            axes[1].plot(*zip(*block), style, label=f"{model} {mode}")
    for ax, what in zip(axes, ("end to end", "shared-block steps only")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (max_num_seqs)")
        ax.set_ylabel("output tokens / s")
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
