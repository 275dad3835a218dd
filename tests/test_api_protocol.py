"""The server's pure parts, without a model: request -> SamplingParams, vLLM field names, logprob
shapes, stop-string hold-back in deltas, SSE framing, admission, metrics, CLI flags, dashboard."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from morserve.api import protocol as p
from morserve.api.errors import APIError, error_body
from morserve.api.generation import ChoiceTracker
from morserve.api.logprobs import FLOOR, chat_logprobs, completion_logprobs
from morserve.api.metrics import ServerMetrics
from morserve.api.server import build_parser, create_app, engine_args, main, server_settings
from morserve.api.state import ServerSettings, ServerState
from morserve.api.streaming import DONE, _encode
from morserve.engine import CompletionOutput, RequestOutput, SamplingParams, TickStats
from morserve.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


# ---- requests -----------------------------------------------------------------------------------
def test_sampling_params_defaults_and_mapping():
    req = p.CompletionRequest(prompt="x", stop="END", top_k=5, seed=3, unknown_field=1)
    sp = req.sampling_params(req.max_tokens, logprobs=None)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (16, 1.0, 1.0, 5, 0.0)
    assert sp.stop == ["END"] and sp.seed == 3 and sp.repetition_penalty == 1.0 and sp.n == 1
    assert not hasattr(req, "unknown_field")
    chat = p.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.max_tokens is None and chat.sampling_params(None, None).max_tokens is None


def test_tiny_temperature_is_raised_zero_stays_greedy():
    assert p.CompletionRequest(prompt="x", temperature=1e-30).sampling_params(1, None).temperature == p.MIN_TEMPERATURE
    assert p.CompletionRequest(prompt="x", temperature=0).sampling_params(1, None).greedy


@pytest.mark.parametrize("field,value", [("logit_bias", {"five": 1.0}), ("logit_bias", {"5": 101}), ("top_p", 0.0), ("n", 0), ("min_p", -1)])
def test_bad_sampling_values_raise_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        p.CompletionRequest(prompt="x", **{field: value}).sampling_params(4, None)


def test_prompt_forms():
    for prompt in ("a", ["a", "b"], [1, 2], [[1], [2, 3]]):
        assert p.CompletionRequest(prompt=prompt).prompt == prompt
    for bad in (1, [True], [1.5], [[1, "a"]], None):
        with pytest.raises(ValueError):
            p.CompletionRequest(prompt=bad)


# ---- responses: vLLM's field names --------------------------------------------------------------
@pytest.mark.parametrize("model,fields", [
    (p.CompletionResponse, {"id", "object", "created", "model", "choices", "usage"}),
    (p.CompletionResponseChoice, {"index", "text", "logprobs", "finish_reason", "stop_reason"}),
    (p.CompletionLogProbs, {"text_offset", "token_logprobs", "tokens", "top_logprobs"}),
    (p.ChatCompletionResponse, {"id", "object", "created", "model", "choices", "usage"}),
    (p.ChatCompletionResponseChoice, {"index", "message", "logprobs", "finish_reason", "stop_reason"}),
    (p.ChatCompletionResponseStreamChoice, {"index", "delta", "logprobs", "finish_reason", "stop_reason"}),
    (p.ChatCompletionLogProbsContent, {"token", "logprob", "bytes", "top_logprobs"}),
    (p.UsageInfo, {"prompt_tokens", "completion_tokens", "total_tokens"}),
    (p.ErrorInfo, {"message", "type", "param", "code"}),
    (p.ModelCard, {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}),
    (p.TokenizeResponse, {"count", "max_model_len", "tokens", "token_strs"}),
])
def test_response_fields_match_vllm(model, fields):
    assert fields <= set(model.model_fields)


def test_openapi_schema_resolves_and_both_generation_requests_share_sampling_fields():
    app = create_app(ServerSettings(model="m", served_model_names=["m"]), lambda: pytest.fail("no engine needed"))
    text = json.dumps(app.openapi())
    schema = json.loads(text)
    components = schema["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert refs and refs <= set(components), refs - set(components)
    assert not any("422" in op["responses"] for ops in schema["paths"].values() for op in ops.values())
    for name, own in (("CompletionRequest", "prompt"), ("ChatCompletionRequest", "messages")):
        assert set(p.SamplingRequest.model_fields) <= set(components[name]["properties"])
        assert components[name]["required"] == [own]
    completion, chat = (components[n]["properties"] for n in ("CompletionRequest", "ChatCompletionRequest"))
    assert completion["max_tokens"]["default"] == 16 and chat["max_tokens"].get("default") is None


def test_depths_only_when_asked():
    plain = p.CompletionResponseChoice(index=0, text="a")
    assert "depths" not in plain.model_dump() and "depths" not in json.loads(plain.model_dump_json())
    deep = p.CompletionResponseChoice(index=0, text="a", depths=[1, 3])
    assert deep.model_dump()["depths"] == [1, 3]
    assert p.CompletionStreamResponse(id="c", model="m", choices=[]).object == "text_completion"


def test_error_body_shape():
    body = error_body(429, "busy").model_dump()
    assert body == {"error": {"message": "busy", "type": "RateLimitError", "param": None, "code": 429}}
    assert error_body(418, "teapot").error.type == "BadRequestError"
    assert error_body(502, "gateway").error.type == "InternalServerError"


# ---- logprobs -------------------------------------------------------------------------------------
def test_completion_logprobs_legacy_shape():
    tok = Tokenizer.byte_level()
    ids = [ord("a"), ord("b"), ord("c")]
    entries = [None, {ord("b"): -0.5, ord("z"): -0.1}, {ord("c"): float("-inf")}]
    lp = completion_logprobs(tok, ids, entries, initial_offset=10)
    assert lp.tokens == ["a", "b", "c"] and lp.text_offset == [10, 11, 12]
    assert lp.token_logprobs == [None, -0.5, FLOOR]
    assert lp.top_logprobs == [None, {"b": -0.5, "z": -0.1}, {"c": FLOOR}]
    assert json.loads(lp.model_dump_json())["token_logprobs"][2] == FLOOR


def test_chat_logprobs_top_sorted_and_bytes():
    tok = Tokenizer.byte_level()
    out = chat_logprobs(tok, [ord("x")], [{ord("x"): -2.0, ord("y"): -0.5, ord("z"): -1.0}], num_top=2)
    entry = out.content[0]
    assert (entry.token, entry.logprob, entry.bytes) == ("x", -2.0, [ord("x")])
    assert [t.token for t in entry.top_logprobs] == ["y", "z"]


# ---- deltas ---------------------------------------------------------------------------------------
def _out(texts: list[str], tokens: list[int], finish: str | None = None) -> RequestOutput:
    comps = [CompletionOutput(index=i, text=t, token_ids=list(range(tokens[i])), finish_reason=finish)
             for i, t in enumerate(texts)]
    return RequestOutput("r", None, [1], comps, finished=finish is not None)


def _deltas(tracker: ChoiceTracker, prompt_idx: int, out: RequestOutput) -> list:
    return [d for c in out.outputs if (d := tracker.delta(prompt_idx, out, c)) is not None]


def test_deltas_hold_back_a_possible_stop_string_start():
    tracker = ChoiceTracker(1, SamplingParams(n=1, stop=["STOP"]))
    assert [d.text for d in _deltas(tracker, 0, _out(["hello S"], [7]))] == ["hell"]
    assert [d.text for d in _deltas(tracker, 0, _out(["hello ST"], [8]))] == ["o"]
    final = _deltas(tracker, 0, _out(["hello "], [9], finish="stop"))
    assert [(d.text, d.start, d.finish_reason) for d in final] == [(" ", 8, "stop")]
    assert _deltas(tracker, 0, _out(["hello "], [9], finish="stop")) == []      # finished: nothing more


def test_deltas_without_stop_strings_and_n_indices():
    tracker = ChoiceTracker(2, SamplingParams(n=2))
    ds = _deltas(tracker, 1, _out(["ab", ""], [2, 1]))
    assert [(d.index, d.text, d.start) for d in ds] == [(2, "ab", 0), (3, "", 0)]
    assert _deltas(tracker, 1, _out(["ab", ""], [2, 1])) == []                   # nothing new
    include = ChoiceTracker(1, SamplingParams(stop=["xyz"], include_stop_str_in_output=True))
    assert _deltas(include, 0, _out(["abc"], [3]))[0].text == "abc"


# ---- SSE framing ----------------------------------------------------------------------------------
async def _collect(agen) -> list[str]:
    return [x async for x in agen]


def test_sse_ends_with_done_and_reports_errors_after_start():
    async def chunks():
        yield p.UsageInfo(prompt_tokens=1)
        raise APIError(400, "engine said no")

    events = asyncio.run(_collect(_encode(chunks())))
    assert events[0].startswith("data: {") and events[-1] == DONE == "data: [DONE]\n\n"
    assert json.loads(events[1][len("data: "):]) == {"error": {"message": "engine said no", "type": "BadRequestError",
                                                              "param": None, "code": 400}}
    assert all(e.endswith("\n\n") for e in events)


# ---- admission --------------------------------------------------------------------------------------
def test_admission_limits_and_release():
    async def run():
        state = ServerState(ServerSettings(model="m", served_model_names=["m"], max_num_seqs=4,
                                           max_num_queued_reqs=2), ServerMetrics("m"))
        with pytest.raises(APIError) as never:
            state.admit(7)
        assert never.value.status == 400
        first = state.admit(5)
        with pytest.raises(APIError) as busy:
            state.admit(2)
        assert busy.value.status == 429 and busy.value.headers == {"Retry-After": "1"}
        assert not await state.wait_idle(0.01)
        first.release()
        first.release()
        assert state.in_flight_seqs == 0 and await state.wait_idle(0.01)
        state.admit(6).release()
        with pytest.raises(APIError) as missing:
            state.check_model("other")
        assert missing.value.status == 404 and state.check_model(None) == "m"

    asyncio.run(run())


# ---- metrics ----------------------------------------------------------------------------------------
def _samples(metrics: ServerMetrics) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def test_tick_stats_feed_depth_metrics():
    m = ServerMetrics("tiny", vllm_names=True)
    m.on_tick(TickStats(num_prologue_tokens=5, depth_occupancy=[5, 3, 1], exits_per_depth=[2, 2, 1],
                        kv_blocks_used={0: 4, 1: 3, 2: 2, 3: 1}, kv_usage=0.25, num_running=2, num_waiting=1,
                        num_preemptions=2, num_generated_tokens=2))
    m.on_tick(TickStats(num_prologue_tokens=2, depth_occupancy=[2, 0, 0], exits_per_depth=[2, 0, 0],
                        kv_blocks_used={0: 4}, num_preemptions=3, num_generated_tokens=2))
    s = _samples(m)
    lbl = lambda **kw: tuple(sorted({"model_name": "tiny", **kw}.items()))   # noqa: E731
    assert s[("morserve:depth_occupancy", lbl(depth="1"))] == 2 and s[("morserve:depth_occupancy", lbl(depth="2"))] == 0
    assert s[("morserve:depth_token_ticks_total", lbl(depth="1"))] == 7
    assert s[("morserve:depth_token_ticks_total", lbl(depth="3"))] == 1
    assert s[("morserve:exit_depth_total", lbl(depth="1"))] == 4
    assert s[("morserve:kv_blocks_used", lbl(depth="0"))] == 4
    assert s[("morserve:num_preemptions_total", lbl())] == 3
    assert s[("morserve:generation_tokens_total", lbl())] == 4
    assert s[("morserve:iteration_tokens_total_count", lbl())] == 2
    assert s[("vllm:num_requests_waiting", lbl())] == 0 and s[("vllm:kv_cache_usage_perc", lbl())] == 0
    assert not any(name.startswith("vllm:") for name, _ in _samples(ServerMetrics("tiny")))
    assert ("morserve:depth_occupancy", lbl(depth="1")) not in _samples(ServerMetrics("tiny"))  # own registry


def test_request_timer_counts_ttft_itl_and_finish_reasons():
    m = ServerMetrics("tiny")
    timer = m.request_timer(SamplingParams(n=1, max_tokens=7))
    arrival = time.monotonic()
    comp = CompletionOutput(index=0, token_ids=[1])
    timer.on_output(RequestOutput("r", None, [1, 2, 3], [comp], arrival_time=arrival - 0.5,
                                  first_scheduled_time=arrival - 0.2))
    comp2 = CompletionOutput(index=0, token_ids=[1, 2, 5], finish_reason="length")
    timer.on_output(RequestOutput("r", None, [1, 2, 3], [comp2], finished=True, arrival_time=arrival - 0.5,
                                  first_scheduled_time=arrival - 0.2))
    timer.done()
    s = _samples(m)
    lbl = lambda **kw: tuple(sorted({"model_name": "tiny", **kw}.items()))   # noqa: E731
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_time_per_output_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "request_params_n",
                 "request_params_max_tokens", "time_per_output_token_seconds"):
        assert s[(f"morserve:{name}_count", lbl())] == 1, name
    assert abs(s[("morserve:request_queue_time_seconds_sum", lbl())] - 0.3) < 1e-6
    assert 0.2 <= s[("morserve:request_prefill_time_seconds_sum", lbl())] < 1.0
    assert s[("morserve:request_prompt_tokens_sum", lbl())] == 3 == s[("morserve:prompt_tokens_total", lbl())]
    assert s[("morserve:request_generation_tokens_sum", lbl())] == 3
    assert s[("morserve:request_params_max_tokens_sum", lbl())] == 7
    assert s[("morserve:request_success_total", lbl(finished_reason="length"))] == 1
    assert s[("morserve:request_success_total", lbl(finished_reason="stop"))] == 0


def test_every_label_value_is_exported_at_zero_and_vllm_names_alias_all():
    m = ServerMetrics("tiny", vllm_names=True)
    m.engine_ready(3, 4, {"block_size": "16", "num_gpu_blocks": "100"})
    s = _samples(m)
    lbl = lambda **kw: tuple(sorted({"model_name": "tiny", **kw}.items()))   # noqa: E731
    for prefix in ("morserve", "vllm"):
        for reason in ("stop", "length", "abort"):
            assert s[(f"{prefix}:request_success_total", lbl(finished_reason=reason))] == 0
        assert s[(f"{prefix}:num_preemptions_total", lbl())] == 0
        assert s[(f"{prefix}:cache_config_info", lbl(block_size="16", num_gpu_blocks="100"))] == 1
    for d in ("1", "2", "3"):
        assert s[("morserve:depth_occupancy", lbl(depth=d))] == 0
        assert s[("morserve:depth_token_ticks_total", lbl(depth=d))] == 0
    assert s[("morserve:kv_blocks_used", lbl(depth="3"))] == 0
    names = {name for name, _ in s}
    for vllm in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:time_per_output_token_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:request_prefill_time_seconds_count",
                 "vllm:request_decode_time_seconds_count", "vllm:request_inference_time_seconds_count",
                 "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
                 "vllm:request_params_n_count", "vllm:request_params_max_tokens_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:iteration_tokens_total_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:request_time_per_output_token_seconds_count"):
        assert vllm in names, vllm
    assert not any(n.startswith("vllm:depth") for n in names)
    m.on_tick(TickStats(depth_occupancy=[4, 1, 0], exits_per_depth=[3, 1, 0], kv_usage=0.5))
    s = _samples(m)
    assert s[("vllm:gpu_cache_usage_perc", lbl())] == 0.5 == s[("morserve:kv_cache_usage_perc", lbl())]


# ---- CLI --------------------------------------------------------------------------------------------
def test_cli_flags_spelled_like_vllm():
    ns = build_parser().parse_args([])
    assert (ns.model, ns.host, ns.port, ns.batching, ns.dtype) == ("morserve-mini-mor3", "127.0.0.1", 8000,
                                                                    "depthwise", "auto")
    ns = build_parser().parse_args([
        "--model", "m", "--served-model-name", "a", "b", "--batching", "vanilla", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "256", "--block-size", "8", "--gpu-memory-utilization", "0.5",
        "--num-kv-blocks", "100", "--dtype", "float32", "--device", "cpu", "--max-model-len", "128", "--seed", "3",
        "--api-key", "k", "--max-num-queued-reqs", "-1", "--shutdown-timeout", "5", "--enable-force-include-usage",
        "--vllm-metric-names", "--log-level", "debug", "--enforce-eager", "--cuda-graph-max-tokens", "64",
        "--num-scheduler-steps", "4"])
    args = engine_args(ns)
    assert (args.batching, args.max_num_seqs, args.max_num_batched_tokens, args.block_size, args.num_kv_blocks,
            args.gpu_memory_utilization, args.max_model_len, args.seed) == ("vanilla", 8, 256, 8, 100, 0.5, 128, 3)
    assert (args.enforce_eager, args.cuda_graph_max_tokens, args.num_scheduler_steps) == (True, 64, 4)
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        engine_args(build_parser().parse_args(["--num-scheduler-steps", "0"]))
    settings = server_settings(ns)
    assert settings.served_model_names == ["a", "b"] and settings.max_num_queued_reqs is None
    assert settings.api_key == "k" and settings.enable_force_include_usage and settings.vllm_metric_names


@pytest.mark.parametrize("flag,expected", [("536870912", 512 << 20), ("512M", 512 << 20), ("2G", 2 << 30),
                                           ("1.5GiB", 3 << 29), ("64kb", 64 << 10)])
def test_kv_cache_memory_bytes_reaches_engine_args_and_sizes_the_pool(flag, expected):
    args = engine_args(build_parser().parse_args(["--kv-cache-memory-bytes", flag]))
    assert args.kv_cache_memory == expected and args.num_kv_blocks is None
    assert args.num_pages(page_bytes=1 << 10, worst_case_pages=1 << 40, device=torch.device("cpu")) == expected >> 10
    assert engine_args(build_parser().parse_args([])).kv_cache_memory is None


@pytest.mark.parametrize("argv,needle", [
    (["--kv-cache-memory-bytes", "lots"], "expected a byte count"),
    (["--kv-cache-memory-bytes=-1G"], "expected a byte count"),
    (["--kv-cache-memory-bytes", "2X"], "expected a byte count"),
    (["--kv-cache-memory-bytes", "0"], "at least 1 byte"),
    (["--kv-cache-memory-bytes", "1G", "--num-kv-blocks", "10"], "not allowed with argument"),
])
def test_bad_kv_cache_memory_bytes_is_an_argparse_error(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--kv-cache-memory-bytes" in err and needle in err


def test_morserve_serve_dispatches_here(capsys):
    from morserve.cli import main as morserve_main
    with pytest.raises(SystemExit) as exc:
        morserve_main(["serve", "--help"])
    assert exc.value.code == 0 and "--max-num-queued-reqs" in capsys.readouterr().out


def test_cli_rejects_bad_engine_args_before_starting():
    with pytest.raises(SystemExit) as exc:
        main(["--max-num-seqs", "0"])
    assert exc.value.code == 2


# ---- Grafana dashboard ---------------------------------------------------------------------------------
def test_dashboard_is_grafana_json_over_exported_metrics():
    dash = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    assert dash["title"] and dash["schemaVersion"] >= 30 and dash["panels"]
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    assert any("morserve:depth_occupancy" in e and "by (depth)" in e for e in exprs)
    metrics = ServerMetrics("m")
    metrics.engine_ready(3, 4, {"block_size": "16"})          # depth labels and cache_config_info
    exported = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    used = {n for e in exprs for n in re.findall(r"morserve:[a-z0-9_]+", e)}
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_time_per_output_token_seconds",
                 "time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_params_n", "request_params_max_tokens", "cache_config_info", "kv_cache_usage_perc",
                 "time_to_first_token_seconds", "e2e_request_latency_seconds", "request_success_total",
                 "num_preemptions_total", "num_requests_running", "num_requests_waiting"):
        assert any(u.removesuffix("_bucket") == f"morserve:{name}" for u in used), name
    for name in {n for e in exprs for n in re.findall(r"morserve:[a-z0-9_]+", e)}:
        base = re.sub(r"_(bucket|total)$", "", name)
        assert name in exported or base in exported, name
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
