"""morserve on Ray Serve, on a local Ray cluster on this CPU machine: 2 replicas of the default model
behind Ray's HTTP proxy, driven through the official openai client.

Checked: concurrent requests land on both replicas (the `x-morserve-replica` header, and each
replica's own /metrics port counting exactly the tokens of the requests that name it), greedy
outputs equal the offline LLM's, streaming, and `ray.kill` of one replica under load: no request
that had not started on the killed replica fails, Ray replaces the replica. One cluster (module
scope, started and shut down here); fresh random prompts each run.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import openai
import pytest
import torch
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.config import HTTPOptions

from morserve.engine import LLM, SamplingParams
from morserve.serving.ray_app import APP_NAME, application, builder_argv, parse_checked
from morserve.serving.ray_flags import deployment_options

MODEL = "morserve-mini-mor3"
SEQS_PER_REPLICA = 4              # max_num_seqs = max_ongoing_requests: the rest waits in Ray's router
WORDS = "the a river stone light cat house garden morning city song paper window friend water story".split()


def free_port(consecutive: int = 1) -> int:
    """A port p such that p .. p+consecutive-1 are free on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for k in range(1, consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port range")


@dataclass
class Cluster:
    url: str
    metrics_ports: list[int]


@pytest.fixture(scope="module")
def cluster():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port, metrics_base = free_port(), free_port(2)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
        ns = parse_checked(["--model", MODEL, "--device", "cpu", "--num-replicas", "2", "--threads-per-replica", "1",
                            "--max-num-seqs", str(SEQS_PER_REPLICA), "--max-num-batched-tokens", "256",
                            "--replica-metrics-port", str(metrics_base), "--vllm-metric-names"])
        serve.run(application(ns), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", [metrics_base, metrics_base + 1])
    finally:
        serve.shutdown()
        ray.shutdown()
        torch.set_num_threads(threads)


@pytest.fixture
def oai(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def random_prompts(n: int) -> list[str]:
    rng = random.Random()
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def offline_texts(prompts: list[str], max_tokens: int) -> list[str]:
    outs = LLM(model=MODEL, device="cpu").generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                           ignore_eos=True))
    return [o.outputs[0].text for o in outs]


def replica_metrics(port: int) -> dict[str, list]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def generated_tokens(metrics: dict[str, list]) -> float:
    return sum(s.value for s in metrics["morserve:generation_tokens"] if s.name.endswith("_total"))


def test_requests_spread_over_both_replicas_and_match_offline(oai, cluster):
    prompts, max_tokens = random_prompts(8), 10
    before = {p: generated_tokens(replica_metrics(p)) for p in cluster.metrics_ports}

    def complete(prompt: str):
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, extra_body={"ignore_eos": True})
        return raw.headers["x-morserve-replica"], raw.headers.get_list("x-request-id"), raw.parse()

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(complete, prompts))
    replicas = [r for r, _, _ in results]
    assert len(set(replicas)) == 2, f"8 concurrent requests, {SEQS_PER_REPLICA} per replica at most: {replicas}"
    assert all(len(ids) == 1 for _, ids, _ in results), "x-request-id sent once (Ray's proxy echoes it)"
    assert [c.choices[0].text for _, _, c in results] == offline_texts(prompts, max_tokens)
    assert all(c.usage.completion_tokens == max_tokens for _, _, c in results)

    # each replica's own /metrics counts exactly the tokens of the requests that name it (the tick
    # listener that counts them may run just after the last token went out: poll briefly)
    expected = sorted(max_tokens * replicas.count(r) for r in set(replicas))
    deadline = time.monotonic() + 10
    while True:
        after = {p: replica_metrics(p) for p in cluster.metrics_ports}
        deltas = sorted(generated_tokens(after[p]) - before[p] for p in cluster.metrics_ports)
        if deltas == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert deltas == expected
    for metrics in after.values():
        depths = {s.labels["depth"] for s in metrics["morserve:depth_occupancy"]}
        assert depths == {"1", "2", "3"}
        assert "vllm:num_requests_waiting" in metrics


def test_streaming_matches_the_full_completion(oai):
    prompt = random_prompts(1)[0]
    full = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    with oai.completions.with_streaming_response.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}) as raw:
        assert raw.headers["x-morserve-replica"].startswith("SERVE_REPLICA::")
        chunks = list(raw.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@dataclass
class Streamed:
    """One streamed request under the kill: which replica answered (None: no response began), its text."""

    replica: str | None = None
    text: str = ""
    error: str | None = None
    first_chunk: threading.Event = field(default_factory=threading.Event)


def replica_states() -> dict[str, int]:
    status = serve.status().applications[APP_NAME].deployments["MorServe"]
    return {getattr(k, "value", k): n for k, n in status.replica_states.items() if n}


def test_killing_a_replica_loses_no_request_that_had_not_started_on_it(oai, cluster):
    prompts, max_tokens = random_prompts(16), 24
    results = [Streamed() for _ in prompts]

    def stream(prompt: str, out: Streamed) -> None:
        try:
            with oai.completions.with_streaming_response.create(
                    model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                    extra_body={"ignore_eos": True}) as raw:
                out.replica = raw.headers["x-morserve-replica"]
                for chunk in raw.parse():
                    out.text += "".join(c.text for c in chunk.choices)
                    out.first_chunk.set()
        except (openai.APIError, httpx.HTTPError) as exc:
            out.error = f"{type(exc).__name__}: {exc} {getattr(exc, 'body', '')}"
        finally:
            out.first_chunk.set()

    pool = ThreadPoolExecutor(len(prompts))
    for prompt, out in zip(prompts, results):
        pool.submit(stream, prompt, out)
    # kill the replica of the first request that streams, while the router still holds the others
    deadline = time.monotonic() + 120
    while not any(r.first_chunk.is_set() and r.replica for r in results):
        assert time.monotonic() < deadline, "no stream began"
        time.sleep(0.02)
    victim = next(r.replica for r in results if r.first_chunk.is_set() and r.replica)
    ray.kill(ray.get_actor(victim, namespace="serve"))
    pool.shutdown(wait=True)

    # Ray hands a replica at most SEQS_PER_REPLICA requests; a request there answers its headers only
    # with its first token, so one the victim held may fail with no replica header: at most
    # SEQS_PER_REPLICA fail, none that streamed from the survivor, every other output is right.
    expected = offline_texts(prompts, max_tokens)
    failed = [r for r in results if r.error]
    assert len(failed) <= SEQS_PER_REPLICA, f"more requests failed than the killed replica held: {failed}"
    assert all(r.replica in (None, victim) for r in failed), failed
    for r, text in zip(results, expected):
        assert r.error or r.text == text
    survivors = [r for r in results if r.replica not in (None, victim)]
    assert survivors and all(r.error is None for r in survivors)
    print(f"\nkilled {victim}: {len(failed)} request(s) failed "
          f"({sum(1 for r in failed if r.replica == victim)} broken streams, the rest before their first "
          f"token), {len(results) - len(failed)}/{len(results)} completed; errors: {[r.error for r in failed]}")

    # Ray replaces the replica; the application serves again from two replicas
    deadline = time.monotonic() + 120
    while replica_states() != {"RUNNING": 2}:
        assert time.monotonic() < deadline, f"replica not replaced: {replica_states()}"
        time.sleep(0.5)
    seen: set[str] = set()              # the proxy's router learns of the new replica a little later
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt="a river", max_tokens=2)
        seen.add(raw.headers["x-morserve-replica"])
        time.sleep(0.1)
    assert len(seen) == 2 and victim not in seen, seen


# ---- the flags -> Serve options (no cluster) ----------------------------------------------------
def test_flags_make_fixed_or_autoscaling_deployment_options():
    fixed = deployment_options(parse_checked(["--num-replicas", "3", "--threads-per-replica", "2"]), cluster_gpus=0)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert fixed["max_ongoing_requests"] == 64 and fixed["graceful_shutdown_timeout_s"] == 30.0
    auto = deployment_options(parse_checked(["--max-replicas", "4", "--min-replicas", "0", "--num-replicas", "2",
                                             "--target-ongoing-requests", "8", "--max-num-seqs", "16"]), cluster_gpus=8)
    assert "num_replicas" not in auto and auto["max_ongoing_requests"] == 16
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 2,
                                          "target_ongoing_requests": 8.0}
    assert auto["ray_actor_options"]["num_gpus"] == 1.0                       # the cluster has GPUs
    on_cpu = deployment_options(parse_checked(["--device", "cpu"]), cluster_gpus=8)
    assert on_cpu["ray_actor_options"]["num_gpus"] == 0.0


@pytest.mark.parametrize("argv,needle", [(["--num-replicas", "0"], "--num-replicas"),
                                         (["--min-replicas", "1"], "--max-replicas"),
                                         (["--max-replicas", "2", "--min-replicas", "3"], "--min-replicas"),
                                         (["--target-ongoing-requests", "0"], "--target-ongoing-requests"),
                                         (["--replica-metrics-port", "70000"], "--replica-metrics-port")])
def test_bad_ray_flags_are_named(argv, needle, capsys):
    with pytest.raises(SystemExit):
        parse_checked(argv)
    assert needle in capsys.readouterr().err


def test_builder_args_become_flags():
    argv = builder_argv({"model": "m", "num_replicas": 2, "vllm_metric_names": True, "enforce_eager": "false",
                         "served_model_name": ["a", "b"]})
    assert argv == ["--model", "m", "--num-replicas", "2", "--vllm-metric-names", "--served-model-name", "a", "b"]
    ns = parse_checked(argv)
    assert (ns.model, ns.num_replicas, ns.vllm_metric_names, ns.served_model_name) == ("m", 2, True, ["a", "b"])


def test_replica_benchmark_table_reports_each_count_against_the_first():
    from benchmarks import ray_replicas

    args = ray_replicas.parse_args(["--replicas", "1,2", "--rounds", "2"])
    assert args.counts == [1, 2]
    rows = {1: {"output_throughput": [100.0, 80.0], "mean_output_throughput": 90.0, "failed": 0,
                "ttft_ms": {"mean": 1200.0, "p50": 1100.0, "p99": 2500.0}},
            2: {"output_throughput": [150.0, 165.0], "mean_output_throughput": 157.5, "failed": 1,
                "ttft_ms": {"mean": 600.0, "p50": 550.0, "p99": 900.0}}}
    table = ray_replicas.markdown(args, rows).splitlines()
    assert table[2] == "| 1 | 100.0, 80.0 | 90.0 | 1.00x | 1200 | 1100 | 2500 | 0 |"
    assert table[3] == "| 2 | 150.0, 165.0 | 157.5 | 1.75x | 600 | 550 | 900 | 1 |"
    with pytest.raises(SystemExit):
        ray_replicas.parse_args(["--replicas", "0,2"])
