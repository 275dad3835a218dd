"""`morserve convert`: a vanilla Llama checkpoint (anything `load_pretrained` reads, e.g.
`smollm2-135m-instruct`) into a middle-cycle MoR checkpoint with Nr recursions.

The L original layers map to: layer 0 -> prologue, layer L-1 -> epilogue, and the M = L-2 middle
layers onto a shared block of B layers (default B = M // Nr; with M not a multiple of Nr the
last M - B*Nr middle layers have no place in the looped model). The block is initialised by the
Relaxed Recursive Transformer rules (Bae et al. 2024):
- `stepwise`: block position j takes middle layer j * Nr (every Nr-th layer);
- `average`: block position j takes the mean of the middle layers the loop places at j,
  i.e. r * B + j for r = 0..Nr-1.
Embeddings, final norm and LM head are copied; routers are freshly initialised (normal, small
std) so every gate starts near alpha * act(0); `--router none` gives the plain recursive model
(every token takes every recursion, ungated), the Relaxed Recursive Transformer baseline.
Without uptraining (`morserve train --init`) the
converted model is much worse than the original: `--eval-text` measures by how much.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from morserve.checkpoint import load_pretrained, save_checkpoint
from morserve.config import ModelConfig, MoRConfig
from morserve.model.mor import MoRModel
from morserve.model.reference import reference_forward
from morserve.threads import add_threads_flag, set_threads
from morserve.tokenizer import Tokenizer
from morserve.train.losses import lm_loss

INITS = ("stepwise", "average")


def layer_sources(num_layers: int, num_recursions: int, init: str, block_layers: int | None = None) -> list[list[int]]:
    """For each block position, the original layer indices whose weights it takes (averaged when
    more than one)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    middle = num_layers - 2
    b = block_layers or middle // num_recursions
    if b < 1 or b * num_recursions > middle:
        raise ValueError(f"cannot place a block of {b} layers x {num_recursions} recursions "
                         f"in the {middle} middle layers of a {num_layers}-layer model")
    if init == "stepwise":
        return [[1 + j * num_recursions] for j in range(b)]
    return [[1 + r * b + j for r in range(num_recursions)] for j in range(b)]


def mor_config(vanilla: ModelConfig, num_recursions: int, block_layers: int, router: str | None, alpha: float,
               kv_mode: str, capacity: list[float] | None) -> ModelConfig:
    """The vanilla config with a middle-cycle MoR section and 2 + B * Nr layers."""
    data = vanilla.to_dict()
    data["num_hidden_layers"] = 2 + block_layers * num_recursions
    data["mor"] = MoRConfig(num_recursions=num_recursions, sharing="middle_cycle", router=router,
                            router_func="softmax" if router == "token" else "sigmoid", alpha=alpha,
                            kv_mode=kv_mode, capacity=capacity).__dict__
    return ModelConfig.from_dict(data)


def convert(vanilla: MoRModel, num_recursions: int, init: str = "stepwise", router: str | None = "expert",
            alpha: float = 0.1, kv_mode: str = "recursion", capacity: list[float] | None = None,
            block_layers: int | None = None, router_std: float = 1e-3, seed: int = 0) -> MoRModel:
    """A MoRModel initialised from the vanilla (Nr = 1, no router, middle_cycle) `vanilla`."""
    vc = vanilla.config
    if vc.mor.num_recursions != 1 or vc.mor.router is not None or vc.mor.sharing != "middle_cycle":
        raise ValueError("convert needs a vanilla model (one recursion, no router)")
    sources = layer_sources(vc.num_hidden_layers, num_recursions, init, block_layers)
    model = MoRModel(mor_config(vc, num_recursions, len(sources), router, alpha, kv_mode, capacity))
    src = vanilla.state_dict()
    layers = ([f"prologue.{i}." for i in range(len(vanilla.prologue))] +
              [f"block.{i}." for i in range(len(vanilla.block))] +
              [f"epilogue.{i}." for i in range(len(vanilla.epilogue))])   # original order 0..L-1
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        if name.startswith(("routers.", "router.")):
            state[name] = torch.randn(param.shape, generator=gen) * router_std
        elif name.startswith("block."):
            j, rest = name[len("block."):].split(".", 1)
            state[name] = torch.stack([src[layers[i] + rest].float() for i in sources[int(j)]]).mean(0)
        elif name.startswith("prologue."):
            state[name] = src[name].float()
        elif name.startswith("epilogue."):
            state[name] = src[layers[-1] + name.split(".", 2)[2]].float()
        else:
            state[name] = src[name].float()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def text_loss(model: MoRModel, tokenizer: Tokenizer, text: str, seq_len: int = 256,
              max_tokens: int = 4096) -> float:
    """Mean next-token loss (threshold routing) over consecutive windows of `text`."""
    ids = torch.tensor(tokenizer.encode(text)[:max_tokens + 1])
    total = count = 0.0
    for s in range(0, len(ids) - 1, seq_len):
        x, y = ids[s:s + seq_len], ids[s + 1:s + seq_len + 1]
        x = x[:len(y)]
        total += lm_loss(reference_forward(model, x).logits, y).item() * len(y)
        count += len(y)
    return total / count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morserve convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="vanilla Llama: checkpoint path, .gguf, or smollm2-135m-instruct")
    p.add_argument("--out", required=True, help="MoR checkpoint directory to write")
    p.add_argument("--num-recursions", type=int, default=3)
    p.add_argument("--init", choices=INITS, default="stepwise")
    p.add_argument("--block-layers", type=int, help="B (default: (L-2) // Nr)")
    p.add_argument("--router", choices=["expert", "token", "none"], default="expert",
                   help="none: a plain recursive model (every token takes every recursion, ungated)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--kv-mode", choices=["recursion", "share_first"], default="recursion")
    p.add_argument("--capacity", help="comma-separated per-recursion capacities")
    p.add_argument("--router-std", type=float, default=1e-3, help="std of the fresh router weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-text", help="report next-token loss of original vs converted on this text")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    add_threads_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    pre = load_pretrained(args.source, dtype=torch.float32)
    capacity = [float(c) for c in args.capacity.split(",")] if args.capacity else None
    router = None if args.router == "none" else args.router
    model = convert(pre.model, args.num_recursions, args.init, router, args.alpha, args.kv_mode,
                    capacity, args.block_layers, args.router_std, args.seed)
    sources = layer_sources(pre.model.config.num_hidden_layers, args.num_recursions, args.init, args.block_layers)
    out = Path(args.out)
    save_checkpoint(model, pre.tokenizer, out, dtype=getattr(torch, args.save_dtype))
    report = {"source": str(args.source), "init": args.init, "num_recursions": args.num_recursions,
              "block_sources": sources, "parameters_original": pre.model.num_parameters(),
              "parameters_converted": model.num_parameters()}
    print(f"{args.source}: {pre.model.config.num_hidden_layers} layers, {pre.model.num_parameters() / 1e6:.1f} M "
          f"-> MoR Nr={args.num_recursions}, block of {len(sources)} ({args.init}: {sources}), "
          f"{model.num_parameters() / 1e6:.1f} M parameters; saved to {out}")
    if args.eval_text:
        if pre.tokenizer is None:
            raise SystemExit("--eval-text needs a tokenizer in the source checkpoint")
        text = Path(args.eval_text).read_text(encoding="utf-8", errors="replace")
        seq = min(256, pre.model.config.max_position_embeddings)
        before = text_loss(pre.model, pre.tokenizer, text, seq, args.eval_tokens)
        after = text_loss(model, pre.tokenizer, text, seq, args.eval_tokens)
        report.update(eval_text=args.eval_text, eval_tokens=args.eval_tokens, loss_original=before,
                      loss_converted=after, ppl_original=math.exp(before), ppl_converted=math.exp(min(after, 50.0)))
        print(f"next-token loss on {args.eval_text}: original {before:.3f} (ppl {math.exp(before):.1f}), "
              f"converted without uptraining {after:.3f} (ppl {math.exp(min(after, 50.0)):.1f})")
    (out / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
