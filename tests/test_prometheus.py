"""A real Prometheus server (the Debian package `prometheus`, which .ci/run installs) scrapes a
running morserve every second; PromQL queries over its HTTP API must return what the server
exported: request counters by finish reason (0 for reasons never seen), per-depth gauges and
counters, vLLM's names next to ours, cache_config_info."""

from __future__ import annotations

import shutil
import subprocess
import threading

import httpx
import pytest

from morserve.api.server import create_app
from morserve.api.state import ServerSettings
from morserve.engine import AsyncLLMEngine, EngineArgs
from tests.test_server import ENGINE, MODEL, ThreadedServer, free_port, wait_for, write_checkpoint

PROMETHEUS = shutil.which("prometheus")
PROMPTS, N, TOKENS = 4, 2, 120          # the load: long enough for a few 1 s scrapes


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("prom") / "tiny", chat_template=None)
    settings = ServerSettings(model=str(ckpt), served_model_names=[MODEL], vllm_metric_names=True)
    server = ThreadedServer(create_app(settings, lambda: AsyncLLMEngine.from_args(
        EngineArgs(model=str(ckpt), **ENGINE)))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prom(srv, tmp_path_factory):
    assert PROMETHEUS, "the prometheus binary is missing: apt-get install prometheus (.ci/run does)"
    work = tmp_path_factory.mktemp("prometheus")
    target = srv.url.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: morserve\n    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            return httpx.get(url + "/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 60, "prometheus did not start", every=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def query(prom: str, promql: str) -> dict[tuple, float]:
    """{sorted label items (without job/instance): value} of an instant vector query."""
    data = httpx.get(prom + "/api/v1/query", params={"query": promql}).json()
    assert data["status"] == "success", data
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("job", "instance"))): float(r["value"][1])
            for r in data["data"]["result"]}


def scalar(prom: str, promql: str) -> float | None:
    result = query(prom, promql)
    return next(iter(result.values())) if result else None


def exported(srv, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(srv.url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_promql_over_a_scraped_server_returns_what_it_exported(srv, prom):
    # per-depth gauges exist (at 0) before any request
    wait_for(lambda: scalar(prom, "count(morserve:depth_occupancy)") == 3, 30, "per-depth gauges not scraped")
    assert scalar(prom, 'sum(vllm:request_success_total{finished_reason="abort"})') == 0
    # a long load: Prometheus must see tokens at depth 1 while it runs
    load_done = threading.Event()

    def load():
        with httpx.Client(base_url=srv.url, timeout=300) as client:
            client.post("/v1/completions", json={"model": MODEL, "prompt": [f"load {i}" for i in range(PROMPTS)],
                                                 "max_tokens": TOKENS, "ignore_eos": True, "n": N})
        load_done.set()

    worker = threading.Thread(target=load)
    worker.start()
    wait_for(lambda: (scalar(prom, 'max_over_time(morserve:depth_occupancy{depth="1"}[1m])') or 0) > 0, 60,
             "no scrape saw a token at depth 1 under load")
    worker.join(300)
    assert load_done.is_set()
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for extra in ({"max_tokens": 30, "stop_token_ids": list(range(258))}, {"max_tokens": 5, "ignore_eos": True}):
            r = client.post("/v1/completions", json={"model": MODEL, "prompt": "count me", **extra})
            assert r.status_code == 200, r.text
    want_length, want_stop = PROMPTS * N + 1, 1
    idle = lambda: exported(srv, "morserve:num_requests_running") == 0   # noqa: E731
    wait_for(idle, 30, "server did not go idle")
    generated = exported(srv, "morserve:generation_tokens_total")
    ticks = {d: exported(srv, "morserve:depth_token_ticks_total", depth=d) for d in ("1", "2", "3")}

    def scraped_after_idle() -> bool:
        return scalar(prom, "sum(vllm:generation_tokens_total)") == generated
    wait_for(scraped_after_idle, 30, "prometheus did not scrape the final counters")
    by_reason = query(prom, "sum by (finished_reason) (morserve:request_success_total)")
    assert by_reason == {(("finished_reason", "length"),): want_length, (("finished_reason", "stop"),): want_stop,
                         (("finished_reason", "abort"),): 0}
    assert query(prom, "sum by (finished_reason) (vllm:request_success_total)") == by_reason
    assert generated == PROMPTS * N * TOKENS + 1 + 5
    assert scalar(prom, "sum(morserve:generation_tokens_total)") == generated
    depth_ticks = query(prom, "sum by (depth) (morserve:depth_token_ticks_total)")
    assert depth_ticks == {(("depth", d),): v for d, v in ticks.items()}
    assert depth_ticks[(("depth", "1"),)] >= PROMPTS * N * TOKENS
    assert query(prom, "sum by (depth) (morserve:depth_occupancy)") == {(("depth", d),): 0 for d in ticks}
    assert scalar(prom, "sum(vllm:num_requests_running)") == 0
    assert scalar(prom, 'vllm:cache_config_info{block_size="4"}') == 1
    assert scalar(prom, "sum(vllm:request_params_n_count)") == PROMPTS + 2
