"""Online serving benchmark: a load generator for any OpenAI-compatible `/v1/completions` server
(morserve's server.py, vLLM, ...), in the manner of `vllm bench serve`.

Requests arrive as a Poisson process at --request-rate per second (inf: all at once), optionally
capped at --max-concurrency in flight; each streams its completion over SSE. Reported: request
throughput, output (and total) token throughput, and TTFT (time to first token), TPOT (time per
output token after the first), ITL (gap between streamed chunks) and end-to-end latency: mean and
chosen percentiles (default p50, p99). Token counts come from the stream's `usage` (requested with
stream_options.include_usage); a server that sends none is counted one token per text chunk.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --model tiny --num-prompts 200 \\
        --request-rate 8 --input-len 64 --output-len 128 --ignore-eos --json result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river mountain light sound water story "
         "question answer garden window city music paper table house friend morning evening").split()


# ---- per request -------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """One request: timestamps relative to its send time (seconds)."""

    success: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for fewer than two tokens)."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def timing_result(chunk_times: list[float], end: float, output_tokens: int, prompt_tokens: int) -> RequestResult:
    """A successful request from the arrival times of its text chunks (relative to sending)."""
    if not chunk_times:
        return RequestResult(success=False, error="the stream carried no text", latency=end)
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return RequestResult(success=True, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                         ttft=chunk_times[0], latency=end, itl=itl)


# ---- statistics --------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def describe(values: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """mean and each pXX of `values` (None when empty)."""
    keys = ["mean"] + [f"p{q:g}" for q in percentiles]
    if not values:
        return dict.fromkeys(keys)
    out = {"mean": sum(values) / len(values)}
    out.update({f"p{q:g}": percentile(values, q) for q in percentiles})
    return out


def summarize(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict:
    """Throughputs over the whole benchmark and latency statistics in milliseconds."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def ms(values: list[float]) -> dict[str, float | None]:
        return {k: None if v is None else 1e3 * v for k, v in describe(values, percentiles).items()}

    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": len(ok) / duration if duration > 0 else 0.0,
            "output_throughput": out_tokens / duration if duration > 0 else 0.0,
            "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
            "ttft_ms": ms([r.ttft for r in ok]),
            "tpot_ms": ms([r.tpot for r in ok if r.tpot is not None]),
            "itl_ms": ms([gap for r in ok for gap in r.itl]),
            "e2el_ms": ms([r.latency for r in ok]),
            "errors": sorted({r.error for r in results if r.error})[:10]}


def poisson_delays(n: int, rate: float, seed: int) -> list[float]:
    """Gaps before each of n requests: exponential with mean 1/rate (rate inf: all zero)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def random_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


# ---- client ------------------------------------------------------------------------------------
def payload(args: argparse.Namespace, prompt: str) -> dict:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True          # vLLM's extension (morserve, vLLM); not plain OpenAI
    return body


async def send(client: httpx.AsyncClient, url: str, headers: dict, body: dict) -> RequestResult:
    """Stream one completion; never raises (failures come back as results)."""
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage: dict = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(success=False, error=f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestResult(success=False, error=f"stream error: {event['error']}")
                if any(c.get("text") for c in event.get("choices") or []):
                    chunk_times.append(time.perf_counter() - start)
                usage = event.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(success=False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter() - start
    return timing_result(chunk_times, end, usage.get("completion_tokens", len(chunk_times)),
                         usage.get("prompt_tokens", 0))


async def run_benchmark(args: argparse.Namespace, prompts: list[str]) -> tuple[list[RequestResult], float]:
    """Send every prompt on its Poisson schedule; returns the results and the wall time."""
    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(prompts)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        probe = await send(client, url, headers, {**payload(args, prompts[0]), "max_tokens": 2})
        if not probe.success:
            raise SystemExit(f"the test request to {url} failed: {probe.error}")
        gate = asyncio.Semaphore(limit)

        async def limited(prompt: str) -> RequestResult:
            async with gate:
                return await send(client, url, headers, payload(args, prompt))

        start = time.perf_counter()
        tasks = []
        for prompt, delay in zip(prompts, poisson_delays(len(prompts), args.request_rate, args.seed)):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(prompt)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# ---- report ------------------------------------------------------------------------------------
def markdown(config: dict, summary: dict) -> str:
    def num(v: float | None, fmt: str = "{:.2f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    lines = ["## Serving benchmark", ""] + [f"- **{k}**: {v}" for k, v in config.items()] + [""]
    lines += ["| metric | value |", "|---|---:|",
              f"| successful requests | {summary['completed']} |", f"| failed requests | {summary['failed']} |",
              f"| duration (s) | {summary['duration_s']:.2f} |",
              f"| total input tokens | {summary['total_input_tokens']} |",
              f"| total output tokens | {summary['total_output_tokens']} |",
              f"| request throughput (req/s) | {summary['request_throughput']:.2f} |",
              f"| output token throughput (tok/s) | {summary['output_throughput']:.1f} |",
              f"| total token throughput (tok/s) | {summary['total_token_throughput']:.1f} |", ""]
    stats = list(summary["ttft_ms"])
    lines += ["| latency (ms) | " + " | ".join(stats) + " |", "|---|" + "---:|" * len(stats)]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        lines.append(f"| {label} | " + " | ".join(num(summary[key][s]) for s in stats) + " |")
    if summary["errors"]:
        lines += ["", "Errors: " + "; ".join(summary["errors"])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", required=True, help="the model name the server answers to")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=64, help="words per random prompt")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly --output-len tokens (vLLM extension)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--percentiles", default="50,99", help="comma-separated percentiles to report")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write config + summary as JSON here")
    p.add_argument("--markdown", default=None, help="also write the markdown report here")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        p.error("--num-prompts and --max-concurrency must be >= 1")
    if args.request_rate <= 0:
        p.error("--request-rate must be > 0 (inf for all at once)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = random_prompts(args.num_prompts, args.input_len, args.seed)
    results, duration = asyncio.run(run_benchmark(args, prompts))
    percentiles = [float(q) for q in args.percentiles.split(",") if q]
    summary = summarize(results, duration, percentiles)
    config = {"base_url": args.base_url, "model": args.model, "num_prompts": args.num_prompts,
              "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
              "max_concurrency": args.max_concurrency,
              "input_len_words": args.input_len, "output_len": args.output_len, "ignore_eos": args.ignore_eos}
    report = markdown(config, summary)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "summary": summary,
                                               "requests": [asdict(r) for r in results]}, indent=2) + "\n")
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
