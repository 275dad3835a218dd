"""Figures (matplotlib, Agg backend): training curves from a train_log.jsonl, a depth histogram,
and a text rendered with every token's background coloured by its recursion depth."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

DEPTH_COLORS = ["#d9ecff", "#7fb8ef", "#2f6fc0", "#17366e", "#0b1a38"]


def depth_color(depth: int) -> str:
    return DEPTH_COLORS[min(depth, len(DEPTH_COLORS)) - 1]


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a train_log.jsonl."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        (evals if "eval" in record else train).append(record)
    return train, evals


def plot_training_log(log_path: str | Path, png_path: str | Path, routing: str = "threshold",
                      train_routing: str = "top-k") -> Path:
    """Left: training LM loss and held-out loss (inference routing `routing`, and top-k when
    logged) per step. Right: mean depth (training under `train_routing`, held-out under
    `routing`) and threshold-vs-top-k agreement (expert choice)."""
    train, evals = read_log(log_path)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], lw=0.8, label="train (LM)")
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["eval"]["val_loss"] for r in evals], "o-", label=f"held-out, {routing}")
        if "val_loss_topk" in evals[0]["eval"]:
            ax.plot(steps, [r["eval"]["val_loss_topk"] for r in evals], "s--", label="held-out, top-k routing")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.plot([r["step"] for r in train], [r["mean_depth"] for r in train], lw=0.8, label=f"mean depth (train, {train_routing})")
    if evals:
        ax2.plot(steps, [r["eval"]["mean_depth"] for r in evals], "o-", label=f"mean depth (held-out, {routing})")
    ax2.set(xlabel="step", ylabel="recursions", title="routing")
    ax2.grid(alpha=0.3)
    handles = ax2.get_lines()
    if evals and "depth_agreement" in evals[0]["eval"]:
        ax3 = ax2.twinx()
        ax3.plot(steps, [r["eval"]["decision_agreement"] for r in evals], "^:", color="tab:green",
                 label="threshold vs top-k: decisions (held-out)")
        ax3.plot(steps, [r["eval"]["depth_agreement"] for r in evals], "v:", color="tab:red",
                 label="threshold vs top-k: final depth (held-out)")
        ax3.set_ylim(0, 1.02)
        ax3.set_ylabel("agreement")
        handles += ax3.get_lines()
    ax2.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def plot_depth_histogram(hists: dict[str, list[float]], png_path: str | Path, title: str) -> Path:
    """Grouped bars: fraction of tokens at each depth, one series per routing rule."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    n = len(hists)
    width = 0.8 / n
    for i, (label, hist) in enumerate(hists.items()):
        xs = [d + 1 + (i - (n - 1) / 2) * width for d in range(len(hist))]
        bars = ax.bar(xs, hist, width=width, label=label)
        ax.bar_label(bars, labels=[f"{v:.1%}" for v in hist], fontsize=8)
    depths = range(1, len(next(iter(hists.values()))) + 1)
    ax.set(xticks=list(depths), xlabel="recursion depth", ylabel="fraction of tokens", title=title)
    ax.set_ylim(0, 1.3 * max(max(h) for h in hists.values()))
    ax.legend(loc="upper center", ncol=n, fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def plot_depth_text(pieces: list[str], depths: list[int], num_recursions: int, png_path: str | Path,
                    title: str, width_chars: int = 100) -> Path:
    """The text, token by token (monospace), each token's background coloured by its depth."""
    rows: list[list[tuple[int, str, int]]] = [[]]
    col = 0
    for piece, depth in zip(pieces, depths):
        for k, part in enumerate(piece.split("\n")):
            if k > 0:
                rows.append([])
                col = 0
            if col + len(part) > width_chars and col > 0:
                rows.append([])
                col = 0
            if part:
                rows[-1].append((col, part, depth))
                col += len(part)
    char_w, row_h = 0.6, 1.45
    fig_w = max(6.0, width_chars * char_w * 0.125)
    fig, ax = plt.subplots(figsize=(fig_w, 0.9 + 0.19 * len(rows)))
    for i, row in enumerate(rows):
        y = -i * row_h
        for col, text, depth in row:
            ax.add_patch(Rectangle((col * char_w, y - 0.55), len(text) * char_w, 1.3,
                                   facecolor=depth_color(depth), edgecolor="white", lw=0.3))
            ax.text(col * char_w, y, text.replace("$", r"\$"), family="monospace", fontsize=8,
                    va="center", color="white" if depth >= 3 else "black")
    ax.set_xlim(0, width_chars * char_w)
    ax.set_ylim(-len(rows) * row_h, row_h)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=depth_color(d), label=f"depth {d}") for d in range(1, num_recursions + 1)],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=num_recursions, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)
