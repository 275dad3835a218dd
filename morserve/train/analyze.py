"""`morserve analyze MODEL --text FILE`: how a MoR model routes a text.

Runs the dense reference forward over consecutive windows of the text with the inference rule
(threshold) and, for expert choice, with training-time top-k, and reports: mean depth, the depth
histogram, router entropy, threshold-vs-top-k agreement (per decision and per final depth), mean
depth by token kind and by token frequency, and the tokens routed deepest and shallowest.
Writes `depth_text.png` (the text coloured by per-token depth), `depth_hist.png` and
`analysis.json` into `--out`, and prints a summary.
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
from morserve.train.losses import router_entropy
from morserve.train.metrics import decision_counts, depth_histogram
from morserve.train.plots import plot_depth_histogram, plot_depth_text

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
                      depth_hist=depth_histogram(depth_t, nr), router_entropy=entropy_sum / len(ids))
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


def summary(a: Analysis) -> str:
    lines = [f"{a.model}: {a.tokens} tokens, Nr = {a.num_recursions}",
             f"mean depth {a.mean_depth:.3f} (threshold routing)",
             "depth histogram: " + ", ".join(f"{d + 1}: {v:.1%}" for d, v in enumerate(a.depth_hist)),
             f"router entropy {a.router_entropy:.3f} nats per decision"]
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morserve analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint path or load_pretrained name (e.g. morserve-mini-mor3)")
    p.add_argument("--text", required=True, help="text file to route")
    p.add_argument("--out", default="analysis", help="directory for the PNGs and analysis.json")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, help="window length (default: min(256, max positions))")
    p.add_argument("--show-tokens", type=int, default=300, help="tokens drawn in depth_text.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pre = load_pretrained(args.model, dtype=torch.float32)
    if pre.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer")
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    ids = pre.tokenizer.encode(text)[:args.max_tokens]
    if not ids:
        raise SystemExit(f"{args.text} has no tokens")
    pieces = [pre.tokenizer.id_to_token(i) for i in ids]
    seq_len = args.seq_len or min(256, pre.model.config.max_position_embeddings)
    result, depths = analyze(pre.model, ids, pieces, seq_len, pre.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nr = result.num_recursions
    hists = {"threshold (inference)": result.depth_hist}
    if result.depth_hist_topk is not None:
        hists["top-k (training)"] = result.depth_hist_topk
    plot_depth_histogram(hists, out / "depth_hist.png", f"{pre.name}: depth per token ({result.tokens} tokens)")
    shown = args.show_tokens
    plot_depth_text(pieces[:shown], depths[:shown], nr, out / "depth_text.png",
                    f"{pre.name}: recursion depth per token (threshold routing)")
    (out / "analysis.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(summary(result))
    print(f"wrote {out / 'depth_text.png'}, {out / 'depth_hist.png'}, {out / 'analysis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
