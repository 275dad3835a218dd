"""The API's depth extension fields (max_depth, router_threshold, allow_depth_reduction) on
completions and chat, their 400s naming the parameter, and the prefix-cache counters in /metrics,
against a real uvicorn on 127.0.0.1 serving a tiny expert-choice checkpoint with prefix caching."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from morserve.api.server import create_app
from morserve.api.state import ServerSettings
from morserve.engine import LLM, AsyncLLMEngine, EngineArgs, SamplingParams
from test_server import CHAT_TEMPLATE, ENGINE, ThreadedServer, wait_idle, write_checkpoint

MODEL = "tiny-mor"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def srv(ckpt):
    settings = ServerSettings(model=str(ckpt), served_model_names=[MODEL], max_num_seqs=8, max_num_queued_reqs=8)
    engine = lambda: AsyncLLMEngine.from_args(EngineArgs(model=str(ckpt), enable_prefix_caching=True, **ENGINE))
    server = ThreadedServer(create_app(settings, engine)).start()
    yield server
    server.stop()


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client


def test_max_depth_and_threshold_on_completions_and_chat(http, srv, ckpt):
    prompt = "The quick brown fox jumps over"
    body = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, ignore_eos=True, return_depths=True)
    offline = LLM(model=str(ckpt), device="cpu")
    for over in (dict(max_depth=1), dict(max_depth=2, router_threshold=0.4), dict(router_threshold=0.0)):
        r = http.post("/v1/completions", json={**body, **over})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want = offline.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **over))[0]
        assert choice["text"] == want.outputs[0].text and choice["depths"] == want.outputs[0].depths
        assert max(choice["depths"]) <= over.get("max_depth", 3)
    chat = http.post("/v1/chat/completions", json=dict(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, ignore_eos=True,
        return_depths=True, max_depth=1, allow_depth_reduction=True))
    assert chat.status_code == 200, chat.text
    assert set(chat.json()["choices"][0]["depths"]) == {1}
    wait_idle(srv)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value", [("max_depth", 4), ("max_depth", 0), ("max_depth", 2.5),
                                         ("router_threshold", 1.5), ("router_threshold", "high"),
                                         ("allow_depth_reduction", "maybe")])
def test_bad_depth_fields_are_400_naming_the_param(http, srv, path, field, value):
    base = dict(model=MODEL, max_tokens=2, prompt="hi") if path == "/v1/completions" else \
        dict(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    r = http.post(path, json={**base, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    wait_idle(srv)


def test_prefix_cache_counters_in_metrics(http, srv):
    def counter(name: str) -> float:
        text = http.get("/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    prompt = "A shared system prompt that is long enough to fill several KV blocks. " * 2
    before = counter("morserve:prefix_cache_hits_total"), counter("morserve:prefix_cache_queries_total")
    for _ in range(2):
        assert http.post("/v1/completions", json=dict(model=MODEL, prompt=prompt, max_tokens=2)).status_code == 200
    wait_idle(srv)
    assert counter("morserve:prefix_cache_queries_total") - before[1] >= 2 * len(prompt)
    assert counter("morserve:prefix_cache_hits_total") - before[0] >= len(prompt) - 8


def test_server_flags_reach_the_engine_args():
    from morserve.api.server import build_parser, engine_args
    ns = build_parser().parse_args(["--model", "m", "--enable-prefix-caching", "--depth-policy", "adaptive",
                                    "--depth-policy-metric", "kv_usage", "--depth-policy-target", "0.7"])
    args = engine_args(ns)
    assert args.enable_prefix_caching and args.depth_policy == "adaptive"
    assert args.depth_policy_metric == "kv_usage" and args.depth_policy_target == 0.7
    assert not engine_args(build_parser().parse_args(["--model", "m"])).enable_prefix_caching
