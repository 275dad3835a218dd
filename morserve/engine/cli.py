"""`morserve generate`: run prompts offline through the engine and print text and depths."""

from __future__ import annotations

import argparse
import sys

from morserve.engine.llm import LLM
from morserve.engine.sampling_params import SamplingParams
from morserve.threads import add_threads_flag, set_threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="morserve generate", description=__doc__)
    p.add_argument("--model", default="morserve-mini-mor3")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batching", choices=["depthwise", "vanilla"], default="depthwise")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    add_threads_flag(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    llm = LLM(model=args.model, batching=args.batching, device=args.device, dtype=args.dtype)
    prompts = args.prompt
    if args.chat:
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            print(f"morserve generate: {args.model} has no chat template; drop --chat to send the prompt "
                  "as plain text", file=sys.stderr)
            return 2
        try:
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in prompts]
        except ValueError as exc:
            print(f"morserve generate: {exc}", file=sys.stderr)
            return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    for prompt, out in zip(args.prompt, llm.generate(prompts, params)):
        comp = out.outputs[0]
        print(f"### {prompt}\n{comp.text}\n[finish: {comp.finish_reason}; depths (of the position that "
              f"produced each token): {comp.depths}]\n")
    return 0
