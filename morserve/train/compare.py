"""Side-by-side comparison of several models (`morserve analyze A B C --compare`,
`morserve.lab.compare`): one plain-text table and one figure from their `ModelSummary`s.

Figure panels: loss (and, on a task, accuracy next to the trivial baseline); the depth
histograms; routing entropy normalised to [0, 1] (bar labels give raw nats / maximum); on a
task, the mean depth of each kind of position (hard vs easy), on a text the mean depth.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from morserve.train.analyze import ModelSummary  # noqa: E402


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_comparison(rows: list[ModelSummary]) -> str:
    """One row per model: routing, loss, accuracy / baseline, mean depth, depth histogram and the
    routing entropy (normalised, raw, maximum)."""
    head = (f"{'model':28s} {'routing':26s} {'loss':>6s} {'acc':>6s} {'base':>6s} {'depth':>5s} "
            f"{'depth histogram':18s} {'H norm':>6s} {'H raw':>6s} {'H max':>6s}")
    lines = [f"comparison on {rows[0].data}" if rows else "no models", head]
    for r in rows:
        hist = " ".join(f"{v:.0%}" for v in r.depth_hist)
        lines.append(f"{r.model[-28:]:28s} {r.routing:26s} {r.loss:6.3f} {_opt(r.accuracy, '6.1%')} "
                     f"{_opt(r.baseline, '6.1%')} {r.mean_depth:5.2f} {hist:18s} {_opt(r.entropy_norm, '6.3f')} "
                     f"{_opt(r.entropy, '6.3f')} {_opt(r.entropy_max, '6.3f')}")
    kinds = list(dict.fromkeys(k for r in rows for k in r.by_kind))      # task order, first model first
    if kinds:
        lines.append("mean depth (accuracy) per kind of position:")
        for r in rows:
            lines.append(f"  {r.model[-28:]:28s} " + ", ".join(
                f"{k} {r.by_kind[k]['mean_depth']:.2f} ({r.by_kind[k]['accuracy']:.0%})" for k in kinds if k in r.by_kind))
    return "\n".join(lines)


def _bars(ax, labels: list[str], values: list[float], texts: list[str], color: str) -> None:
    bars = ax.bar(range(len(values)), values, color=color)
    ax.bar_label(bars, labels=texts, fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)


def plot_comparison(rows: list[ModelSummary], png_path: str | Path) -> Path:
    """The 2 x 2 comparison figure (see module doc)."""
    names = [r.model.rstrip("/").split("/")[-1] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    x = range(len(rows))
    if all(r.accuracy is not None for r in rows):
        w = 0.4
        acc = ax.bar([i - w / 2 for i in x], [r.accuracy for r in rows], w, label="accuracy")
        base = ax.bar([i + w / 2 for i in x], [r.baseline for r in rows], w, label="trivial baseline", color="0.7")
        ax.bar_label(acc, labels=[f"{r.accuracy:.0%}" for r in rows], fontsize=7)
        ax.bar_label(base, labels=[f"{r.baseline:.0%}" for r in rows], fontsize=7)
        ax.set_ylim(0, 1.3)
        ax.set_ylabel("next-token accuracy (predictable positions)")
        ax2 = ax.twinx()
        ax2.plot(list(x), [r.loss for r in rows], "kD", label="loss")
        ax2.set_ylabel("loss (nats)")
        ax2.set_ylim(0, 1.2 * max(r.loss for r in rows) + 1e-9)
        ax.legend(handles=[acc, base, *ax2.get_lines()], loc="upper center", ncol=3, fontsize=7)
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"accuracy and loss on {rows[0].data}")
    else:
        _bars(ax, names, [r.loss for r in rows], [f"{r.loss:.3f}" for r in rows], "tab:blue")
        ax.set(ylabel="loss (nats/token)", title=f"next-token loss on {rows[0].data}")
    ax = axes[0][1]
    nr = max(r.num_recursions for r in rows)
    w = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        hist = r.depth_hist + [0.0] * (nr - len(r.depth_hist))
        ax.bar([d + 1 + (i - (len(rows) - 1) / 2) * w for d in range(nr)], hist, w, label=names[i])
    ax.set(xticks=list(range(1, nr + 1)), xlabel="recursion depth", ylabel="fraction of positions",
           title="depth histogram (inference routing)")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    norm = [r.entropy_norm or 0.0 for r in rows]
    _bars(ax, names, norm, [f"{r.entropy:.3f}/{r.entropy_max:.3f}" if r.entropy_max else "no router" for r in rows],
          "tab:purple")
    ax.set_ylim(0, 1.1)
    ax.set(ylabel="entropy / maximum", title="routing entropy, normalised (labels: raw nats / max)")
    ax = axes[1][1]
    kinds = [k for k in rows[0].by_kind] if rows[0].by_kind else []
    if kinds:
        w = 0.8 / len(rows)
        for i, r in enumerate(rows):
            ax.bar([j + (i - (len(rows) - 1) / 2) * w for j in range(len(kinds))],
                   [r.by_kind.get(k, {}).get("mean_depth", 0.0) for k in kinds], w, label=names[i])
        ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
        ax.set(ylabel="mean depth", title="depth by kind of position")
        ax.legend(fontsize=7)
    else:
        _bars(ax, names, [r.mean_depth for r in rows], [f"{r.mean_depth:.2f}" for r in rows], "tab:green")
        ax.set(ylabel="mean depth", title="mean depth")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
