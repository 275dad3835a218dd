"""Evaluation on a synthetic task: accuracy next to the depth each kind of position received.

For every kind of target position (see `morserve.train.tasks`) the report gives the share of
positions, next-token accuracy (argmax of the logits), the trivial baseline (always predicting
the kind's most frequent target), and the depth of the position that produced the prediction
(mean and histogram). Overall numbers cover the predictable kinds (those in the training loss).
So the question "does the router send the hard positions deeper?" is answered by comparing the
mean depth of a hard kind (copy, count, repeat) with that of an easy one (delimiter, separator,
end) and of the unpredictable ones.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch

from morserve.model.mor import MoRModel
from morserve.model.reference import reference_forward
from morserve.train.losses import lm_loss
from morserve.train.metrics import depth_histogram
from morserve.train.tasks import Task, TaskBatch


@dataclass
class KindReport:
    name: str
    predictable: bool
    share: float              # fraction of all target positions
    accuracy: float
    baseline: float           # accuracy of the kind's most frequent target
    mean_depth: float         # depth of the positions that predict this kind
    depth_hist: list[float]


@dataclass
class TaskReport:
    task: str
    routing: str
    loss: float               # cross-entropy over the predictable positions
    accuracy: float           # over the predictable positions
    baseline: float           # per-kind most-frequent guess, over the predictable positions
    mean_depth: float
    depth_hist: list[float]
    kinds: list[KindReport] = field(default_factory=list)

    def kind(self, name: str) -> KindReport:
        return next(k for k in self.kinds if k.name == name)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return format_task_report(self)


def _baseline_hits(targets: torch.Tensor) -> int:
    """How many of `targets` the single most frequent one matches."""
    return int(torch.bincount(targets).max()) if targets.numel() else 0


@torch.no_grad()
def evaluate_task(model: MoRModel, task: Task, batch: TaskBatch, routing: str = "threshold",
                  chunk: int = 256) -> TaskReport:
    """Per-kind accuracy and depth of `model` on `batch` of `task` (routing: threshold, the
    inference rule, or topk, the expert-choice training rule)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, depths, losses = [], [], []
    targets = batch.loss_targets(task.kinds)
    for s in range(0, len(batch.inputs), chunk):
        out = reference_forward(model, batch.inputs[s:s + chunk].to(device), routing=routing)
        preds.append(out.logits.argmax(-1).cpu())
        depths.append(out.depths.cpu())
        t = targets[s:s + chunk].to(device)
        n = int((t >= 0).sum())
        losses.append((lm_loss(out.logits, t).item() * n, n))
    model.train(was_training)
    pred, depth = torch.cat(preds), torch.cat(depths)
    nr = model.config.mor.num_recursions
    correct = pred == batch.next_tokens
    total = batch.kinds.numel()
    kinds = []
    hits = base_hits = scored = 0
    for i, kind in enumerate(task.kinds):
        mask = batch.kinds == i
        n = int(mask.sum())
        if n == 0:
            continue
        base = _baseline_hits(batch.next_tokens[mask])
        kinds.append(KindReport(kind.name, kind.predictable, n / total, float(correct[mask].float().mean()),
                                base / n, float(depth[mask].float().mean()), depth_histogram(depth[mask], nr)))
        if kind.predictable:
            hits, base_hits, scored = hits + int(correct[mask].sum()), base_hits + base, scored + n
    loss_sum = sum(v for v, _ in losses)
    loss_n = sum(n for _, n in losses)
    return TaskReport(task.name, routing, loss_sum / max(loss_n, 1), hits / max(scored, 1), base_hits / max(scored, 1),
                      float(depth.float().mean()), depth_histogram(depth, nr), kinds)


def format_task_report(report: TaskReport) -> str:
    """A plain-text table: one row per kind."""
    lines = [f"task {report.task} ({report.routing} routing): loss {report.loss:.3f}, accuracy "
             f"{report.accuracy:.1%} vs baseline {report.baseline:.1%} (predictable positions), "
             f"mean depth {report.mean_depth:.2f}",
             f"{'kind':12s} {'pred.':5s} {'share':>6s} {'acc':>7s} {'base':>7s} {'depth':>6s}  depth histogram"]
    for k in report.kinds:
        hist = " ".join(f"{v:.0%}" for v in k.depth_hist)
        lines.append(f"{k.name:12s} {'yes' if k.predictable else 'no':5s} {k.share:6.1%} {k.accuracy:7.1%} "
                     f"{k.baseline:7.1%} {k.mean_depth:6.2f}  {hist}")
    return "\n".join(lines)


class TaskData:
    """The trainer's data source for a task: fresh random samples each step (loss on the
    predictable positions only) and a fixed evaluation set of `eval_size` samples."""

    def __init__(self, task: Task, eval_size: int = 512, seed: int = 1234) -> None:
        self.task = task
        self.seq_len = task.seq_len
        self.eval_batch = task.batch(eval_size, torch.Generator().manual_seed(seed))

    def describe(self) -> str:
        return f"task {self.task.name} (length {self.task.seq_len}), {len(self.eval_batch.inputs)} eval samples"

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.task.batch(batch_size, generator)
        return batch.inputs, batch.loss_targets(self.task.kinds)

    def evaluate(self, model: MoRModel, autocast: AbstractContextManager | None = None) -> dict:
        """val_loss / accuracy / baseline / mean_depth / depth_hist over the predictable positions,
        and per kind: accuracy, baseline and mean depth (threshold routing)."""
        with autocast or nullcontext():
            report = evaluate_task(model, self.task, self.eval_batch)
        return {"val_loss": report.loss, "accuracy": report.accuracy, "baseline": report.baseline,
                "mean_depth": report.mean_depth, "depth_hist": report.depth_hist,
                "by_kind": {k.name: {"accuracy": k.accuracy, "baseline": k.baseline, "mean_depth": k.mean_depth}
                            for k in report.kinds}}
