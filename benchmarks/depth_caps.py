"""Quality and throughput of per-request depth caps (SamplingParams.max_depth = 1..Nr).

Quality: held-out loss (next-token cross-entropy, nats) of the model with every token capped at
max_depth, computed by the dense reference forward (the engine's oracle) over the held-out tail
of the training corpus in windows of 256 tokens, as models/morserve-mini-mor3/README.md measured
it (the last 1% of the token stream of scripts/build_corpus.py's output; full depth gives the
README's 4.395). Throughput: the engine serving N greedy requests (prompts: held-out windows) with
that cap, output tokens per second over the run; caps run interleaved, `--repeats` times each,
the table shows the median (and the range). Writes a markdown table and a PNG plot.

    python scripts/build_corpus.py runs/corpus/pydocs.txt         # once (needs python3.11-doc)
    python benchmarks/depth_caps.py --corpus runs/corpus/pydocs.txt --out runs/depth_caps
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from morserve.checkpoint import load_pretrained  # noqa: E402
from morserve.engine import EngineArgs, LLMEngine, SamplingParams  # noqa: E402
from morserve.model import reference_forward  # noqa: E402
from morserve.train.data import encode_corpus, read_texts, split_holdout  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(_REPO / "models" / "morserve-mini-mor3"))
    p.add_argument("--corpus", default=str(_REPO / "runs" / "corpus" / "pydocs.txt"))
    p.add_argument("--val-fraction", type=float, default=0.01, help="as `morserve train` (its default)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(_REPO / "runs" / "depth_caps"))
    return p.parse_args(argv)


def heldout(args: argparse.Namespace, tokenizer) -> torch.Tensor:
    ids = encode_corpus(tokenizer, read_texts(args.corpus))
    return split_holdout(ids, args.val_fraction, min_tokens=2 * args.window + 2)[1]


@torch.no_grad()
def heldout_loss(model, val: torch.Tensor, window: int, cap: int, batch: int = 8) -> tuple[float, float, int]:
    """(mean loss, mean depth, tokens) over consecutive windows of the held-out ids."""
    n = (len(val) - 1) // window
    xs = torch.stack([val[i * window:(i + 1) * window] for i in range(n)])
    ys = torch.stack([val[i * window + 1:(i + 1) * window + 1] for i in range(n)])
    loss = depth = 0.0
    for s in range(0, n, batch):
        out = reference_forward(model, xs[s:s + batch], max_depth=cap)
        loss += F.cross_entropy(out.logits.float().flatten(0, 1), ys[s:s + batch].flatten(), reduction="sum").item()
        depth += out.depths.sum().item()
    return loss / ys.numel(), depth / ys.numel(), ys.numel()


def throughput(model, tokenizer, prompts: list[list[int]], cap: int, output_len: int) -> float:
    engine = LLMEngine(model, tokenizer, EngineArgs(model=model, device="cpu", max_num_seqs=len(prompts)))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, max_depth=cap,
                            output_kind="final_only")
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    return len(prompts) * output_len / (time.perf_counter() - start)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    caps = [r["max_depth"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(caps, [r["loss"] for r in rows], "o-", color="tab:blue", label="held-out loss")
    ax.set_xlabel("max_depth (recursion cap per token)")
    ax.set_ylabel("held-out loss (nats)", color="tab:blue")
    ax.set_xticks(caps)
    tw = ax.twinx()
    tw.errorbar(caps, [r["tok_s"] for r in rows], yerr=[[r["tok_s"] - r["tok_s_min"] for r in rows],
                                                         [r["tok_s_max"] - r["tok_s"] for r in rows]],
                fmt="s--", color="tab:red", capsize=3, label="output tok/s")
    tw.set_ylabel("engine output tokens/s (CPU)", color="tab:red")
    ax.set_title("morserve-mini-mor3: depth cap vs quality and throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pre = load_pretrained(args.model, device="cpu", dtype=torch.float32)
    model, tokenizer = pre.model.eval(), pre.tokenizer
    nr = model.config.mor.num_recursions
    val = heldout(args, tokenizer)
    print(f"held-out tail: {len(val)} tokens", flush=True)
    quality = {cap: heldout_loss(model, val, args.window, cap) for cap in range(1, nr + 1)}
    for cap, (loss, depth, n) in quality.items():
        print(f"max_depth {cap}: held-out loss {loss:.4f} over {n} tokens, mean depth {depth:.3f}", flush=True)
    step = len(val) // args.num_requests
    prompts = [val[i * step: i * step + args.prompt_len].tolist() for i in range(args.num_requests)]
    speeds: dict[int, list[float]] = {cap: [] for cap in range(1, nr + 1)}
    for _ in range(args.repeats):
        for cap in range(1, nr + 1):
            speeds[cap].append(throughput(model, tokenizer, prompts, cap, args.output_len))
            print(f"max_depth {cap}: {speeds[cap][-1]:.1f} output tok/s", flush=True)
    rows = [dict(max_depth=cap, loss=quality[cap][0], mean_depth=quality[cap][1], tokens=quality[cap][2],
                 tok_s=statistics.median(speeds[cap]), tok_s_min=min(speeds[cap]), tok_s_max=max(speeds[cap]))
            for cap in range(1, nr + 1)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "depth_caps.png")
    (out / "depth_caps.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    full = rows[-1]["tok_s"]
    print(f"\n{args.num_requests} requests x ({args.prompt_len} prompt + {args.output_len} output) tokens, greedy, "
          f"{args.threads} thread(s), median of {args.repeats}; loss over {rows[0]['tokens']} held-out tokens\n")
    print("| max_depth | held-out loss | mean depth | output tok/s (range) | vs full depth |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_depth']} | {r['loss']:.4f} | {r['mean_depth']:.3f} | {r['tok_s']:.1f} "
              f"({r['tok_s_min']:.1f}-{r['tok_s_max']:.1f}) | {r['tok_s'] / full:.2f}x |")
    print(f"\nplot: {out / 'depth_caps.png'}")


if __name__ == "__main__":
    main()
