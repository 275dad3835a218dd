"""The HTTP server against a real uvicorn on 127.0.0.1 (streams, disconnects and timing need real
sockets): the official openai client, vLLM's schemas, concurrent streams, aborts that free KV
blocks, every bad field's 4xx, auth, 429, loading/draining 503s, metrics, SIGTERM drain.

One tiny random MoR checkpoint (byte-level tokenizer, 3 recursions, expert router) is written to a
tmp dir; one in-process server (module scope) serves most tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from morserve.api.server import create_app, uvicorn_config
from morserve.api.state import ServerSettings, ServerState
from morserve.checkpoint import load_checkpoint, save_checkpoint
from morserve.config import ModelConfig, MoRConfig
from morserve.engine import LLM, AsyncLLMEngine, EngineArgs, SamplingParams
from morserve.model import MoRModel, reference_forward
from morserve.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "tiny-mor"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_NUM_SEQS, MAX_QUEUED = 48, 16
ENGINE = dict(device="cpu", max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=512, block_size=4,
              num_kv_blocks=6000, seed=0)
AUTH = {"Authorization": f"Bearer {KEY}"}


def write_checkpoint(path: Path, chat_template: str | None) -> Path:
    tokenizer = Tokenizer.byte_level(chat_template=chat_template)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_ids[0], mor=MoRConfig(num_recursions=3, router="expert"))
    model = MoRModel(cfg).init_weights(seed=7, std=0.3).eval()
    return save_checkpoint(model, tokenizer, path)


class ThreadedServer:
    """uvicorn serving `app` from a thread, on a socket bound to 127.0.0.1 (free port)."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    @property
    def engine(self) -> AsyncLLMEngine:
        return self.state.engine

    def start(self, wait_ready: bool = True) -> ThreadedServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn did not start")
        if wait_ready:
            wait_for(lambda: httpx.get(self.url + "/health").status_code == 200, 60, "model did not load")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def wait_for(pred, timeout: float, what: str, every: float = 0.05) -> None:
    for _ in range(int(timeout / every)):
        if pred():
            return
        time.sleep(every)
    raise AssertionError(what)


def wait_idle(srv: ThreadedServer, timeout: float = 10.0) -> None:
    """Every request gone from server and engine, every KV block and pool row free."""
    wait_for(lambda: srv.state.in_flight_requests == 0 and srv.engine.num_unfinished == 0
             and srv.engine.engine.check_no_leak(), timeout, "engine did not go idle / leaked KV blocks")


@pytest.fixture(scope="module")
def threads_one():
    before = torch.get_num_threads()
    torch.set_num_threads(1)          # 2 shared cores: intra-op threads only fight the event loop
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def srv(ckpt, threads_one):
    settings = ServerSettings(model=str(ckpt), served_model_names=[MODEL, "alias"], max_num_seqs=MAX_NUM_SEQS,
                              max_num_queued_reqs=MAX_QUEUED, api_key=KEY, vllm_metric_names=True)
    app = create_app(settings, lambda: AsyncLLMEngine.from_args(EngineArgs(model=str(ckpt), **ENGINE)))
    server = ThreadedServer(app).start()
    yield server
    server.stop()


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def sse_events(lines) -> list:
    """Parse `data:` lines; [DONE] must be last."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        assert not events or events[-1] != "[DONE]", "data after [DONE]"
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events and events[-1] == "[DONE]"
    return events[:-1]


# ---- the openai client, unchanged ---------------------------------------------------------------
def test_openai_client_completion_matches_offline_engine(oai, ckpt):
    prompts = ["The cat", "Hello world, this is"]
    resp = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0,
                                  extra_body={"return_depths": True, "ignore_eos": True})
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == MODEL
    assert [c.index for c in resp.choices] == [0, 1]
    offline = LLM(model=str(ckpt), device="cpu").generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                                                                                  ignore_eos=True))
    for choice, out in zip(resp.choices, offline):
        assert choice.text == out.outputs[0].text
        assert choice.model_extra["depths"] == out.outputs[0].depths
        assert len(choice.model_extra["depths"]) == 12 and set(choice.model_extra["depths"]) <= {1, 2, 3}
        assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == sum(len(p) for p in prompts)      # byte-level: 1 token per byte
    assert resp.usage.completion_tokens == 24 and resp.usage.total_tokens == resp.usage.prompt_tokens + 24


def test_openai_client_streams_completions_and_chat(oai):
    full = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0)
    chunks = list(oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])

    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    stream = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len("<|user|>hi\n<|assistant|>")


def test_chat_logprobs_and_model_alias(oai):
    resp = oai.chat.completions.create(model="alias", messages=[{"role": "user", "content": "abc"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    assert resp.model == "alias"
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6   # greedy: the chosen one is the top
        assert bytes(entry.bytes).decode("utf-8") == entry.token


def test_several_prompts_times_n_choice_indices(http):
    body = {"model": MODEL, "prompt": [[1, 2, 3], [4, 5]], "n": 3, "max_tokens": 4, "seed": 1, "temperature": 1.0}
    data = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in data["choices"]] == list(range(6))
    assert data["usage"]["prompt_tokens"] == 5 and data["usage"]["completion_tokens"] == 24
    again = http.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in data["choices"]]   # seeded
    assert "depths" not in data["choices"][0]
    streamed = http.post("/v1/completions", json={**body, "stream": True})
    texts = {}
    for ev in sse_events(streamed.text.split("\n")):
        for c in ev["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(6)] == [c["text"] for c in data["choices"]]


def test_echo_logprobs_give_prompt_logprobs_like_lm_eval_needs(http, ckpt):
    prompt = [72, 101, 108, 108, 111, 32, 116]
    data = http.post("/v1/completions", json={"model": MODEL, "prompt": [prompt], "max_tokens": 1, "temperature": 0,
                                              "logprobs": 1, "echo": True, "seed": 1234}).json()
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:len(prompt)] == [chr(t) for t in prompt]
    assert data["choices"][0]["text"].startswith("Hello t")
    assert lp["text_offset"][:3] == [0, 1, 2]
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = torch.log_softmax(reference_forward(model, torch.tensor(prompt)).logits.float(), -1)
    for i in range(1, len(prompt) + 1):
        want = ref[i - 1].max() if i == len(prompt) else ref[i - 1, prompt[i]]     # last: the greedy token
        assert abs(lp["token_logprobs"][i] - float(want)) < 1e-4
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)


def test_stop_string_never_leaks_into_the_stream(http):
    base = {"model": MODEL, "prompt": "Stop here", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    text = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    at = next(i for i in range(5, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[at:at + 2]
    want = text[:text.index(stop)]
    full = http.post("/v1/completions", json={**base, "stop": [stop, "\x00\x00\x00"]}).json()["choices"][0]
    assert full["text"] == want and full["finish_reason"] == "stop" and full["stop_reason"] == stop
    events = sse_events(http.post("/v1/completions", json={**base, "stop": [stop, "\x00\x00\x00"],
                                                           "stream": True}).text.split("\n"))
    assert "".join(e["choices"][0]["text"] for e in events) == want
    assert events[-1]["choices"][0]["stop_reason"] == stop


def _ref_logprobs(ckpt, ids: list[int]) -> torch.Tensor:
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        return torch.log_softmax(reference_forward(model, torch.tensor(ids)).logits.float(), -1)


def test_prompt_logprobs_and_echo_with_max_tokens_0(http, ckpt):
    rng = random.Random()
    prompt = [rng.randrange(1, 256) for _ in range(rng.randrange(4, 10))]
    ref = _ref_logprobs(ckpt, prompt)
    data = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                              "prompt_logprobs": 3, "temperature": 0}).json()
    entries = data["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        entry = entries[i]
        assert entry[str(prompt[i])]["logprob"] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        top = ref[i - 1].topk(3)
        for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-4)
            assert entry[str(token)]["rank"] == rank
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 1,
                                                   "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    only = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True,
                                              "logprobs": 1}).json()
    choice = only["choices"][0]
    assert choice["text"] == bytes(prompt).decode("utf-8", errors="replace")
    assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) and choice["logprobs"]["token_logprobs"][0] is None
    for i in range(1, len(prompt)):
        assert choice["logprobs"]["token_logprobs"][i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
    assert only["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}


def test_return_token_ids_stream_and_not(http):
    body = {"model": MODEL, "prompt": "ids please", "max_tokens": 7, "temperature": 0, "return_token_ids": True,
            "ignore_eos": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["prompt_token_ids"] == list(b"ids please") and len(choice["token_ids"]) == 7
    assert bytes(choice["token_ids"]).decode("utf-8", errors="replace") == choice["text"]
    events = sse_events(http.post("/v1/completions", json={**body, "stream": True}).text.split("\n"))
    assert events[0]["choices"][0]["prompt_token_ids"] == list(b"ids please")
    assert [t for e in events for c in e["choices"] for t in c["token_ids"]] == choice["token_ids"]
    assert len({e["created"] for e in events}) == 1           # one created per request
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 3,
                                                   "return_token_ids": True}).json()
    assert chat["prompt_token_ids"] == list(b"<|user|>hi\n<|assistant|>") and len(chat["choices"][0]["token_ids"]) == 3
    plain = http.post("/v1/completions", json={**body, "return_token_ids": False}).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain


def test_chat_stream_chunks_share_one_created(http):
    events = sse_events(http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MSG, "max_tokens": 20, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}).text.split("\n"))
    assert len(events) > 3 and len({e["created"] for e in events}) == 1 and len({e["id"] for e in events}) == 1


def test_max_tokens_null_is_the_endpoint_default(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": None, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": None,
                                                "ignore_eos": True})
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 256          # the rest of the context


def test_continue_final_message_and_add_generation_prompt(http):
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, the answer"}]
    tok = http.post("/tokenize", json={"model": MODEL, "messages": prefill, "add_generation_prompt": False}).json()
    body = {"model": MODEL, "messages": prefill, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    cont = http.post("/v1/chat/completions", json={**body, "continue_final_message": True,
                                                   "add_generation_prompt": False}).json()
    assert cont["prompt_token_ids"] == list(b"<|user|>hi\n<|assistant|>Sure, the answer")
    assert tok["tokens"] == list(b"<|user|>hi\n<|assistant|>Sure, the answer\n")
    same = http.post("/v1/completions", json={"model": MODEL, "prompt": "<|user|>hi\n<|assistant|>Sure, the answer",
                                              "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
    assert cont["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    closed = http.post("/v1/chat/completions", json={**body, "add_generation_prompt": False}).json()
    assert closed["prompt_token_ids"] == tok["tokens"]
    opened = http.post("/v1/chat/completions", json=body).json()
    assert opened["prompt_token_ids"] == tok["tokens"] + list(b"<|assistant|>")


def test_logit_bias_truncation_request_id_and_retrieve_model(http):
    forced = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5, "temperature": 0,
                                                "logit_bias": {str(ord("Q")): 100}, "ignore_eos": True}).json()
    assert forced["choices"][0]["text"] == "QQQQQ"
    cut = http.post("/v1/completions", json={"model": MODEL, "prompt": "abcdefgh", "max_tokens": 1,
                                             "truncate_prompt_tokens": 3, "echo": True, "request_id": "my-req"}).json()
    assert cut["usage"]["prompt_tokens"] == 3 and cut["choices"][0]["text"].startswith("fgh")
    assert cut["id"] == "cmpl-my-req"
    card = http.get(f"/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 256
    r = http.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ---- concurrency, disconnects, admission ---------------------------------------------------------
def test_32_concurrent_streams_interleave_and_match_unbatched(srv, http):
    prompts = [f"request {i:02d}:" for i in range(32)]

    async def run():
        order: list[int] = []

        async def one(client, i):
            text = ""
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 16, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                        order.append(i)
            return text

        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as client:
            texts = await asyncio.gather(*(one(client, i) for i in range(32)))
        return texts, order

    texts, order = asyncio.run(run())
    first = {i: order.index(i) for i in range(32)}
    last = {i: len(order) - 1 - order[::-1].index(i) for i in range(32)}
    assert max(first.values()) < min(last.values()), "some stream finished before another one started"
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches > 32 * 8
    alone = [http.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0,
                                                "ignore_eos": True}).json()["choices"][0]["text"]
             for p in prompts[:4]]
    assert texts[:4] == alone
    wait_idle(srv)


def _metric(http, name: str, **labels) -> float:
    text = http.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@contextlib.contextmanager
def long_stream_then_disconnect(srv: ThreadedServer) -> Iterator[None]:
    """A long streaming completion, three chunks read; leaving the block drops the connection
    mid-stream (which must abort the request)."""
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()      # referenced until the block ends: then the connection closes
            for _ in range(3):
                assert next(line for line in lines if line).startswith("data: {")
            yield


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(srv, http):
    aborted_before = _metric(http, "morserve:request_success_total", finished_reason="abort")
    with long_stream_then_disconnect(srv):
        assert not srv.engine.engine.blocks.all_free()
    wait_idle(srv, 5)
    assert _metric(http, "morserve:request_success_total", finished_reason="abort") == aborted_before + 1


def test_abort_on_an_idle_engine_resets_the_gauges_without_another_request(srv, http):
    """The abort leaves nothing to run, so no tick follows it: the engine's own snapshot on abort
    is what must bring the load gauges back to an empty engine."""
    aborted_before = _metric(http, "morserve:request_success_total", finished_reason="abort")
    with long_stream_then_disconnect(srv):
        assert _metric(http, "morserve:num_requests_running") == 1
        assert _metric(http, "morserve:kv_cache_usage_perc") > 0
        assert _metric(http, "morserve:depth_occupancy") > 0
    wait_idle(srv, 5)
    assert _metric(http, "morserve:request_success_total", finished_reason="abort") == aborted_before + 1
    gauges = ("morserve:num_requests_running", "morserve:num_requests_waiting", "morserve:kv_cache_usage_perc",
              "morserve:depth_occupancy", "morserve:kv_blocks_used", "vllm:num_requests_running",
              "vllm:kv_cache_usage_perc")
    wait_for(lambda: not any(_metric(http, name) for name in gauges), 5, "gauges kept the aborted request's values")


def test_client_timeout_on_non_streaming_request_aborts_it(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 240,
                                                 "ignore_eos": True})
    wait_idle(srv, 5)


def test_queue_full_gives_429_with_retry_after(srv, http):
    capacity = MAX_NUM_SEQS + MAX_QUEUED
    too_big = http.post("/v1/completions", json={"model": MODEL, "prompt": [[1]] * (capacity + 1), "max_tokens": 1})
    assert too_big.status_code == 400 and str(capacity) in too_big.json()["error"]["message"]
    body = {"model": MODEL, "prompt": [[1, 2]] * (capacity // 2), "n": 2, "max_tokens": 100, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()      # keep it referenced: a collected iterator closes the connection
            assert next(line for line in lines if line).startswith("data: {")
            busy = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "RateLimitError"
    wait_idle(srv, 10)
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}).status_code == 200


# ---- validation: every bad field gets its 4xx ------------------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [[]]}, 400, "prompt"),
    (C, {"prompt": ["ok", ""]}, 400, "prompt"),
    (C, {}, 400, "prompt"),
    (C, {"prompt": 123}, 400, "prompt"),
    (C, {"prompt": [1, "a"]}, 400, "prompt"),
    (C, {"prompt": [1, 2.5]}, 400, "prompt"),
    (C, {"prompt": [100000]}, 400, "100000"),
    (C, {"prompt": [-1]}, 400, "-1"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "x" * 200, "max_tokens": 100}, 400, "300 tokens (200 in the prompt, 100"),
    (C, {"prompt": "x" * 300}, 400, "256"),
    (C, {"prompt": "x", "max_tokens": 10**12}, 400, "256"),
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": 1000}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -3}, 400, "top_k"),
    (C, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (C, {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    (C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    (C, {"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    (C, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (C, {"prompt": "x", "stop_token_ids": [2**63], "min_tokens": 1}, 400, "stop_token_ids"),
    (C, {"prompt": "x", "repetition_penalty": 1e-38}, 400, "repetition_penalty"),      # would overflow to NaN
    (C, {"prompt": "x", "stop_token_ids": list(range(258)), "min_tokens": 2}, 400, "vocabulary"),   # all banned
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop"),
    (C, {"prompt": "x", "seed": 2**64}, 400, "seed"),
    (C, {"prompt": "x", "seed": "abc"}, 400, "seed"),
    (C, {"prompt": "x", "logit_bias": {"1000": 5}}, 400, "logit_bias"),          # not in the vocabulary
    (C, {"prompt": "x", "logit_bias": {"1": 500}}, 400, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"one": 5}}, 400, "logit_bias"),
    (C, {"prompt": "x", "top_k": 2**63}, 400, "top_k"),
    (C, {"prompt": "x", "n": 2**63}, 400, "n"),
    (C, {"prompt": "x", "use_beam_search": True}, 400, "use_beam_search"),
    (C, {"prompt": "x", "length_penalty": 0.5}, 400, "length_penalty"),
    (C, {"prompt": "x", "allowed_token_ids": [1, 2]}, 400, "allowed_token_ids"),
    (C, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (C, {"prompt": "x", "priority": 1}, 400, "priority"),
    (C, {"prompt": "x", "prompt_embeds": "AAAA"}, 400, "prompt_embeds"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "x", "stream": True, "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    (C, {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    (C, {"prompt": "x", "max_tokens": 0, "logprobs": 1}, 400, "max_tokens"),
    (C, {"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    (CHAT, {"messages": MSG, "continue_final_message": True, "add_generation_prompt": True}, 400,
     "continue_final_message"),
    (CHAT, {"messages": MSG, "echo": True}, 400, "echo"),
    (CHAT, {"messages": MSG, "chat_template": "{{ messages }}"}, 400, "chat_template"),
    (CHAT, {"messages": MSG, "top_k": 2**63}, 400, "top_k"),
    (C, {"prompt": "x", "suffix": "tail"}, 400, "suffix"),
    (C, {"prompt": "x", "stream": True, "stream_options": 3}, 400, "stream_options"),
    (C, {"prompt": "x", "echo": "loud"}, 400, "echo"),
    (C, {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"content": "no role"}]}, 400, "role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "text"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 1000}, 400, "256"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool"),
    (CHAT, {"messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format"),
    (CHAT, {"messages": MSG, "model": "nope"}, 404, "nope"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/detokenize", {"tokens": [999999]}, 400, "999999"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,needle", BAD, ids=[f"{p}:{json.dumps(b)[:50]}" for p, b, *_ in BAD])
def test_bad_field_gets_4xx_with_error_body(http, path, body, status, needle):
    if path in (C, CHAT) and "model" not in body:
        body = {**body, "model": MODEL}
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert needle in err["message"], err["message"]
    if status == 400:
        assert err["param"], err


def test_malformed_json_and_wrong_method_and_unknown_route(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert http.get("/v1/completions").status_code == 405
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_unknown_fields_are_ignored_and_engine_survives_bad_requests(srv, http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "frobnicate": {"a": 1},
                                           "best_of": 1, "user": "u1", "temperature": 1e-9})
    assert r.status_code == 200, r.text
    assert srv.engine.error is None and srv.state.phase == "ready"
    wait_idle(srv)


# ---- the small endpoints, auth, request ids ------------------------------------------------------
def test_models_version_tokenize_detokenize(http, srv):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL, "alias"]
    assert models["data"][0]["max_model_len"] == 256 and models["data"][0]["object"] == "model"
    assert http.get("/version").json()["version"]
    tok = http.post("/tokenize", json={"prompt": "héllo", "return_token_strs": True}).json()
    assert tok["count"] == len("héllo".encode()) == len(tok["tokens"]) and tok["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "héllo"}
    chat = http.post("/tokenize", json={"messages": MSG}).json()
    assert chat["count"] == len("<|user|>hi\n<|assistant|>")
    info = http.get("/tokenizer_info").json()          # lm-eval's `remote` tokenizer backend reads this
    assert (info["eos_token"], info["chat_template"], info["model_max_length"]) == ("</s>", CHAT_TEMPLATE, 256)
    assert http.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [257]


def test_api_key_required_except_health_and_metrics(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as anon:
        r = anon.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        assert anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.post("/tokenize", json={"prompt": "x"}).status_code == 401
        assert anon.get("/health").status_code == 200
        assert anon.get("/metrics").status_code == 200
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_request_id_is_echoed(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                  headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert http.get("/health").headers.get("x-request-id")
    assert http.post("/v1/completions", json={}, headers={"x-request-id": "e1"}).headers["x-request-id"] == "e1"


# ---- metrics ------------------------------------------------------------------------------------------
EXPECTED_METRICS = {
    "morserve:num_requests_running", "morserve:num_requests_waiting", "morserve:kv_cache_usage_perc",
    "morserve:prompt_tokens", "morserve:generation_tokens", "morserve:request_success",
    "morserve:num_preemptions", "morserve:time_to_first_token_seconds", "morserve:inter_token_latency_seconds",
    "morserve:e2e_request_latency_seconds", "morserve:iteration_tokens_total", "morserve:depth_occupancy",
    "morserve:depth_token_ticks", "morserve:exit_depth", "morserve:kv_blocks_used",
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
}


def test_metrics_parse_and_depth_occupancy_moves_under_load(srv, http):
    ticks_before = {d: _metric(http, "morserve:depth_token_ticks_total", depth=str(d)) for d in (1, 2, 3)}
    gen_before = _metric(http, "morserve:generation_tokens_total")
    seen = {1: 0.0, 2: 0.0, 3: 0.0}
    done = threading.Event()

    def load():
        try:
            with httpx.Client(base_url=srv.url, headers=AUTH, timeout=120) as client:
                client.post("/v1/completions", json={"model": MODEL, "prompt": [f"load {i}" for i in range(12)],
                                                     "max_tokens": 30, "ignore_eos": True, "temperature": 0})
        finally:
            done.set()

    worker = threading.Thread(target=load)
    worker.start()
    while not done.is_set():
        for d in seen:
            seen[d] = max(seen[d], _metric(http, "morserve:depth_occupancy", depth=str(d)))
        time.sleep(0.02)
    worker.join()
    assert seen[1] > 0 and max(seen[2], seen[3]) > 0, seen
    ticks_after = {d: _metric(http, "morserve:depth_token_ticks_total", depth=str(d)) for d in (1, 2, 3)}
    assert ticks_after[1] - ticks_before[1] >= 12 * 30
    assert ticks_after[1] > ticks_after[2] - ticks_before[2] >= 0      # nested routing: fewer go deeper
    assert _metric(http, "morserve:generation_tokens_total") - gen_before == 12 * 30
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    assert EXPECTED_METRICS <= set(families), EXPECTED_METRICS - set(families)
    for family in families.values():
        if family.name.startswith("morserve:"):
            assert all(s.labels.get("model_name") == MODEL for s in family.samples)
    assert _metric(http, "morserve:exit_depth_total") >= 12 * 30
    assert _metric(http, "morserve:time_to_first_token_seconds_count") >= 12
    assert _metric(http, "morserve:request_success_total", finished_reason="length") >= 12
    assert _metric(http, "morserve:num_requests_running") == 0 == _metric(http, "vllm:num_requests_running")
    assert _metric(http, "morserve:kv_blocks_used", depth="0") == 0


# ---- a second server: loading, a model without chat template, forced usage ---------------------
@pytest.fixture(scope="module")
def plain_srv(tmp_path_factory, threads_one):
    path = write_checkpoint(tmp_path_factory.mktemp("plain") / "plain", chat_template=None)
    release = threading.Event()

    def slow_factory():
        assert release.wait(60)
        return AsyncLLMEngine.from_args(EngineArgs(model=str(path), **{**ENGINE, "max_model_len": 64}))

    settings = ServerSettings(model=str(path), served_model_names=["plain"], enable_force_include_usage=True)
    server = ThreadedServer(create_app(settings, slow_factory)).start(wait_ready=False)
    server.release = release
    yield server
    release.set()
    server.stop()


def test_health_503_while_loading_then_200(plain_srv):
    with httpx.Client(base_url=plain_srv.url, timeout=30) as client:
        r = client.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        plain_srv.release.set()
        wait_for(lambda: client.get("/health").status_code == 200, 60, "never became healthy")


def test_no_chat_template_is_400_and_context_is_max_model_len(plain_srv):
    plain_srv.release.set()
    wait_for(lambda: httpx.get(plain_srv.url + "/health").status_code == 200, 60, "never became healthy")
    with httpx.Client(base_url=plain_srv.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json={"model": "plain", "messages": MSG})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10})
        assert r.status_code == 400 and "64 tokens" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
        events = sse_events(r.text.split("\n"))
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


# ---- SIGTERM drain, server.py as a subprocess -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_running_requests_then_exits(ckpt):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "server.py"), "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", MODEL, "--shutdown-timeout", "60", "--num-kv-blocks", "2000",
                             "--block-size", "4", "--device", "cpu", "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 90, "server.py did not become healthy", every=0.2)
        started = threading.Event()
        result: dict = {}

        def stream():
            body = {"model": MODEL, "prompt": "drain me", "max_tokens": 80, "ignore_eos": True, "stream": True}
            with httpx.Client(timeout=120) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
                result["events"] = sse_events(lines)

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health").status_code == 503, 10, "/health did not turn 503")
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "late"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        reader.join(120)
        events = result["events"]
        assert sum(1 for e in events for _ in e["choices"]) == 80
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---- the multi-step decode loop behind the server ------------------------------------------------
@pytest.fixture(scope="module")
def loop_srv(ckpt, threads_one):
    settings = ServerSettings(model=str(ckpt), served_model_names=[MODEL], max_num_seqs=MAX_NUM_SEQS)
    engine = {**ENGINE, "num_scheduler_steps": 4}
    server = ThreadedServer(create_app(settings, lambda: AsyncLLMEngine.from_args(
        EngineArgs(model=str(ckpt), **engine)))).start()
    yield server
    server.stop()


def test_decode_loop_server_streams_the_same_text_as_the_offline_engine(loop_srv, ckpt):
    """Greedy streams through an engine running 4 ticks per step arrive in bursts but carry exactly
    the text of the one-tick offline engine; a stop string still never leaks."""
    prompts = [f"Story {i}: once" for i in range(6)]
    offline = LLM(model=str(ckpt), device="cpu").generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                                                  ignore_eos=True))
    client = openai.OpenAI(base_url=loop_srv.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(stream, prompts))
    assert texts == [o.outputs[0].text for o in offline]
    stop = offline[0].outputs[0].text[5:7]
    cut = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == offline[0].outputs[0].text.split(stop)[0]
    wait_idle(loop_srv)
    assert loop_srv.engine.engine.check_no_leak()
