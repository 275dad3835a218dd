"""`morserve analyze MODEL --text FILE`: how a MoR model routes a text; `morserve analyze A B C
--compare (--task NAME | --text FILE)`: the same numbers for several models, side by side.

Single model: runs the dense reference forward over consecutive windows of the text with the
inference rule (expert choice: threshold; token choice: argmax of the router) and, for expert
choice, with training-time top-k, and reports: mean depth, the depth histogram, routing entropy
(raw, its maximum and normalised), threshold-vs-top-k agreement (per decision and per final
depth), mean depth by token kind and by token frequency, and the tokens routed deepest and
shallowest. Writes `depth_text.png` (the text coloured by per-token depth), `depth_hist.png` and
`analysis.json` into `--out`, and prints a summary. With `--task` instead of `--text` it prints
accuracy and depth per kind of position of a synthetic task.

Routing entropy is only comparable once normalised: expert choice makes one binary decision per
recursion r >= 2 (maximum ln 2 nats), token choice one Nr-way decision per token (maximum
ln Nr). `ModelSummary` carries the raw value, the maximum, and raw / maximum in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from morserve.checkpoint import load_pretrained
from morserve.model.mor import MoRModel
from morserve.model.reference import reference_forward
from morserve.threads import add_threads_flag, set_threads
from morserve.tokenizer import Tokenizer
from morserve.train.losses import lm_loss, router_entropy
from morserve.train.metrics import decision_counts, depth_histogram, entropy_max, routing_rule
from morserve.train.plots import plot_depth_histogram, plot_depth_text
from morserve.train.task_eval import evaluate_task, format_task_report
from morserve.train.tasks import Task, get_task

KINDS = ("word start", "word continuation", "punctuation", "digit", "whitespace", "other")


@dataclass
class Analysis:
    """Routing statistics of one model on one text (threshold routing unless named top-k)."""

    model: str
    tokens: int
    num_recursions: int
    mean_depth: float
    depth_hist: list[float]
    router_entropy: float
    routing: str = ""
    entropy_max: float | None = None
    entropy_norm: float | None = None
    depth_hist_topk: list[float] | None = None
    mean_depth_topk: float | None = None
    decision_agreement: float | None = None
    depth_agreement: float | None = None
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    by_frequency: dict[str, dict[str, float]] = field(default_factory=dict)
    deepest: list[tuple[str, float, int]] = field(default_factory=list)
    shallowest: list[tuple[str, float, int]] = field(default_factory=list)


def token_kind(piece: str) -> str:
    """Coarse class of a decoded token: word start (leading space + letter), continuation, ..."""
    if not piece.strip():
        return "whitespace"
    core = piece.lstrip(" ")
    if core[0].isalpha():
        return "word start" if piece.startswith(" ") or piece[0].isupper() else "word continuation"
    if core[0].isdigit():
        return "digit"
    if all(not c.isalnum() for c in core.strip()):
        return "punctuation"
    return "other"


def _group_depths(keys: list[str], depths: list[int]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for key, depth in zip(keys, depths):
        groups[key].append(depth)
    return {k: {"mean_depth": sum(v) / len(v), "share": len(v) / len(depths)} for k, v in groups.items()}


def frequency_buckets(ids: list[int]) -> list[str]:
    """Bucket of each token by how often its type occurs in the text: the 20 most frequent types,
    ranks 21-200, and the rest."""
    rank = {tok: i for i, (tok, _) in enumerate(Counter(ids).most_common())}
    return ["top 20 types" if rank[t] < 20 else "types 21-200" if rank[t] < 200 else "rarer types" for t in ids]


@torch.no_grad()
def analyze(model: MoRModel, ids: list[int], pieces: list[str], seq_len: int, name: str) -> tuple[Analysis, list[int]]:
    """Statistics for token ids (with their decoded pieces); also returns per-token depths."""
    mor = model.config.mor
    nr = mor.num_recursions
    depths: list[int] = []
    topk_depths: list[int] = []
    entropy_sum = 0.0
    agree = total = 0
    windows = [ids[s:s + seq_len] for s in range(0, len(ids), seq_len)]
    for window in windows:
        x = torch.tensor(window)[None]
        out = reference_forward(model, x, routing="threshold")
        depths += out.depths[0].tolist()
        if mor.router is not None:
            entropy_sum += router_entropy(out, mor).item() * len(window)
        if mor.router == "expert":
            top = reference_forward(model, x, routing="topk")
            topk_depths += top.depths[0].tolist()
            a, t = decision_counts(top, mor)
            agree, total = agree + a, total + t
    depth_t = torch.tensor(depths)
    result = Analysis(model=name, tokens=len(ids), num_recursions=nr, mean_depth=depth_t.float().mean().item(),
                      depth_hist=depth_histogram(depth_t, nr), router_entropy=entropy_sum / len(ids),
                      routing=routing_rule(mor), entropy_max=entropy_max(mor))
    if result.entropy_max:
        result.entropy_norm = result.router_entropy / result.entropy_max
    if topk_depths:
        topk_t = torch.tensor(topk_depths)
        result.depth_hist_topk = depth_histogram(topk_t, nr)
        result.mean_depth_topk = topk_t.float().mean().item()
        result.depth_agreement = (topk_t == depth_t).float().mean().item()
        result.decision_agreement = agree / total if total else None
    result.by_kind = _group_depths([token_kind(p) for p in pieces], depths)
    result.by_frequency = _group_depths(frequency_buckets(ids), depths)
    per_token: dict[str, list[int]] = defaultdict(list)
    for piece, depth in zip(pieces, depths):
        per_token[piece].append(depth)
    ranked = sorted(((p, sum(v) / len(v), len(v)) for p, v in per_token.items() if len(v) >= 5),
                    key=lambda item: (item[1], item[2]))
    result.deepest = ranked[::-1][:15]
    result.shallowest = ranked[:15]
    return result, depths


def _entropy_text(raw: float | None, maximum: float | None) -> str:
    if maximum is None or raw is None:
        return "n/a (no router)"
    return f"{raw / maximum:.3f} normalised ({raw:.3f} nats per decision of at most {maximum:.3f})"


def summary(a: Analysis) -> str:
    lines = [f"{a.model}: {a.tokens} tokens, Nr = {a.num_recursions}",
             f"mean depth {a.mean_depth:.3f} ({a.routing})",
             "depth histogram: " + ", ".join(f"{d + 1}: {v:.1%}" for d, v in enumerate(a.depth_hist)),
             f"routing entropy {_entropy_text(a.router_entropy, a.entropy_max)}"]
    if a.depth_hist_topk is not None:
        lines += ["top-k depth histogram: " + ", ".join(f"{d + 1}: {v:.1%}" for d, v in enumerate(a.depth_hist_topk)),
                  f"threshold vs top-k agreement: decisions {a.decision_agreement:.1%}, "
                  f"final depth {a.depth_agreement:.1%}"]
    lines.append("mean depth by token kind: " + ", ".join(
        f"{k} {v['mean_depth']:.2f} ({v['share']:.0%})" for k, v in sorted(a.by_kind.items())))
    lines.append("mean depth by frequency: " + ", ".join(
        f"{k} {v['mean_depth']:.2f} ({v['share']:.0%})" for k, v in a.by_frequency.items()))
    lines.append("deepest tokens: " + ", ".join(f"{p!r} {d:.2f}" for p, d, _ in a.deepest[:10]))
    lines.append("shallowest tokens: " + ", ".join(f"{p!r} {d:.2f}" for p, d, _ in a.shallowest[:10]))
    return "\n".join(lines)


@dataclass
class ModelSummary:
    """The comparable numbers of one model on one task or text (inference routing)."""

    model: str
    router: str | None
    num_recursions: int
    sharing: str
    routing: str
    data: str                       # "task copy" or "text FILE (N tokens)"
    loss: float                     # next-token loss (task: over its predictable positions)
    accuracy: float | None          # task only: next-token accuracy over the predictable positions
    baseline: float | None          # task only: the best context-free guess per kind
    mean_depth: float
    depth_hist: list[float]
    entropy: float | None           # nats per routing decision
    entropy_max: float | None       # ln 2 (expert) or ln Nr (token)
    entropy_norm: float | None      # entropy / entropy_max, in [0, 1]
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)


@torch.no_grad()
def summarize(model: MoRModel, tokenizer: Tokenizer | None, name: str, task: Task | None = None,
              text: str | None = None, samples: int = 512, seq_len: int = 256, max_tokens: int = 8192,
              seed: int = 1234) -> ModelSummary:
    """`ModelSummary` of `model` on fresh samples of `task` or on consecutive windows of `text`."""
    if (task is None) == (text is None):
        raise ValueError("summarize needs exactly one of task or text")
    mor = model.config.mor
    was_training = model.training
    model.eval()
    if task is not None:
        batch = task.batch(samples, torch.Generator().manual_seed(seed))
        report = evaluate_task(model, task, batch)
        out = reference_forward(model, batch.inputs)
        entropy = router_entropy(out, mor).item() if mor.router else None
        loss, accuracy, baseline = report.loss, report.accuracy, report.baseline
        depths, data = out.depths, f"task {task.name}"
        by_kind = {k.name: {"accuracy": k.accuracy, "baseline": k.baseline, "mean_depth": k.mean_depth,
                            "share": k.share} for k in report.kinds}
    else:
        if tokenizer is None:
            raise ValueError(f"{name} has no tokenizer to encode the text")
        ids = torch.tensor(tokenizer.encode(text)[:max_tokens + 1])
        if len(ids) < 2:
            raise ValueError("the text has fewer than 2 tokens")
        seq_len = min(seq_len, model.config.max_position_embeddings)
        loss_sum = ent_sum = 0.0
        all_depths = []
        for s in range(0, len(ids) - 1, seq_len):
            x = ids[s:s + seq_len]
            y = ids[s + 1:s + seq_len + 1]
            out = reference_forward(model, x[:len(y)])
            loss_sum += lm_loss(out.logits, y).item() * len(y)
            if mor.router:
                ent_sum += router_entropy(out, mor).item() * len(y)
            all_depths.append(out.depths)
        n = len(ids) - 1
        depths = torch.cat(all_depths)
        loss, accuracy, baseline, by_kind = loss_sum / n, None, None, {}
        entropy = ent_sum / n if mor.router else None
        data = f"text ({n} tokens)"
    model.train(was_training)
    maximum = entropy_max(mor)
    return ModelSummary(name, mor.router, mor.num_recursions, mor.sharing, routing_rule(mor), data, loss, accuracy,
                        baseline, depths.float().mean().item(), depth_histogram(depths, mor.num_recursions),
                        entropy, maximum, entropy / maximum if maximum else None, by_kind)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morserve analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="+", help="checkpoint path(s) or load_pretrained name(s) (e.g. morserve-mini-mor3)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text file to route")
    src.add_argument("--task", choices=["copy", "counting", "pattern"],
                     help="a synthetic task (models trained with morserve train --task)")
    p.add_argument("--compare", action="store_true", help="one table and one figure across the models")
    p.add_argument("--out", default="analysis", help="directory for the PNGs and JSON")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--samples", type=int, default=512, help="task samples to evaluate")
    p.add_argument("--seq-len", type=int, help="window length (default: min(256, max positions))")
    p.add_argument("--show-tokens", type=int, default=300, help="tokens drawn in depth_text.png")
    add_threads_flag(p)
    return p


def _load(name: str):
    pre = load_pretrained(name, dtype=torch.float32)
    if pre.tokenizer is None:
        raise SystemExit(f"{name} has no tokenizer")
    return pre


def _analyze_one(args: argparse.Namespace, out: Path) -> None:
    pre = _load(args.model[0])
    if args.task:
        task = get_task(args.task)
        if pre.model.config.max_position_embeddings < task.seq_len:
            raise SystemExit(f"{pre.name} has {pre.model.config.max_position_embeddings} positions; "
                             f"task {args.task} needs {task.seq_len}")
        report = evaluate_task(pre.model, task, task.batch(args.samples, torch.Generator().manual_seed(1234)))
        (out / "task_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(format_task_report(report))
        print(f"wrote {out / 'task_report.json'}")
        return
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    ids = pre.tokenizer.encode(text)[:args.max_tokens]
    if not ids:
        raise SystemExit(f"{args.text} has no tokens")
    pieces = [pre.tokenizer.id_to_token(i) for i in ids]
    seq_len = args.seq_len or min(256, pre.model.config.max_position_embeddings)
    result, depths = analyze(pre.model, ids, pieces, seq_len, pre.name)
    nr = result.num_recursions
    hists = {f"{result.routing}, inference": result.depth_hist}
    if result.depth_hist_topk is not None:
        hists["top-k (training)"] = result.depth_hist_topk
    plot_depth_histogram(hists, out / "depth_hist.png", f"{pre.name}: depth per token ({result.tokens} tokens)")
    shown = args.show_tokens
    plot_depth_text(pieces[:shown], depths[:shown], nr, out / "depth_text.png",
                    f"{pre.name}: recursion depth per token ({result.routing})")
    (out / "analysis.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(summary(result))
    print(f"wrote {out / 'depth_text.png'}, {out / 'depth_hist.png'}, {out / 'analysis.json'}")


def _compare(args: argparse.Namespace, out: Path) -> None:
    from morserve.train.compare import format_comparison, plot_comparison   # compare imports this module
    text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else None
    task = get_task(args.task) if args.task else None
    rows = []
    for name in args.model:
        pre = _load(name)
        rows.append(summarize(pre.model, pre.tokenizer, name, task=task, text=text, samples=args.samples,
                              seq_len=args.seq_len or 256, max_tokens=args.max_tokens))
    plot_comparison(rows, out / "compare.png")
    (out / "compare.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(format_comparison(rows))
    print(f"wrote {out / 'compare.png'}, {out / 'compare.json'}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    if len(args.model) > 1 and not args.compare:
        raise SystemExit("several models need --compare")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (_compare if args.compare else _analyze_one)(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
