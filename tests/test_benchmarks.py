"""The benchmark scripts: throughput.py --quick end to end (table, JSON, plot, every mode), router
calibration of random expert-choice models, the HF twin of a vanilla model (where transformers is
installed), serving.py's statistics on synthetic timings, and serving.py against a real server.py
on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import serving  # noqa: E402
from benchmarks.mor_models import (QUICK_SHAPE, QUICK_SPECS, calibrate_router_bias, model_config,  # noqa: E402
                                   random_model)
from benchmarks.throughput_report import MODES, TABLE_HEADER  # noqa: E402
from morserve.model import reference_forward  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- throughput.py ---------------------------------------------------------------------------------
def test_quick_run_writes_every_mode_and_column(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "throughput.md").read_text()
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TABLE_HEADER in table and "## Targets" in table
    engine_modes = {r["mode"] for r in rows}
    assert {"seq-wise", "depth-sync", "depth-wise"} <= engine_modes
    for mode in MODES:
        assert f"| {mode} |" in table or (mode == "hf-generate" and "transformers is not importable" in table)
    assert {r["model"] for r in rows} == {s.name for s in QUICK_SPECS}
    assert {r["setting"] for r in rows} == {"fixed", "relative", "memory"}
    for r in rows:
        assert r["finished"] == r["requests"] and not r["partial"] and r["tokens_per_second"] > 0
        if r["mode"] == "hf-generate":
            continue
        assert r["block_tokens_per_second"] > r["tokens_per_second"]      # the block is part of the run
        kv = r["kv_bytes_per_token"]
        assert kv["all"] > kv["block"] > 0 and kv["entries_all"] > kv["entries_block"] > 0
        assert kv["all"] >= kv["entries_all"] and kv["block"] >= kv["entries_block"]   # pages round up
        assert 0 < r["roofline"] < 1 and r["vs_vanilla"] is not None
        fractions = r["depth_fractions"]
        assert fractions[0] == 1.0 and fractions == sorted(fractions, reverse=True)
        if r["mode"] == "depth-wise":
            assert r["vs_sync"] is not None
    mor4 = [r for r in rows if r["model"] == "mor-4" and r["mode"] == "depth-wise"]
    van = [r for r in rows if r["model"] == "vanilla-10" and r["mode"] == "seq-wise"]
    assert mor4[0]["kv_bytes_per_token"]["all"] < van[0]["kv_bytes_per_token"]["all"]  # recursion-wise KV saves
    assert elapsed < 60, f"--quick took {elapsed:.0f}s"


def test_decode_tick_quick_reports_a_steady_decode_tick(tmp_path):
    """The roofline benchmark on CPU: every sequence decodes during the timed ticks, and the ideal
    bytes of a tick cover at least the weights the tick must read."""
    from benchmarks import decode_tick
    assert decode_tick.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tick.json").read_text())
    eager, loop = report["rows"]
    assert (eager["mode"], loop["mode"]) == ("eager", "loop")
    for row in (eager, loop):
        assert row["tick_ms"] > 0 and row["tokens_per_s"] > 0
        assert 0 < row["block_tokens"] <= report["args"]["batch"]
    assert eager["tick_bytes"] > 0 and loop["tick_bytes"] is None and loop["device_tick_ms"] > 0
    table = (tmp_path / "tick.md").read_text()
    assert "| eager |" in table and "| loop |" in table


def test_router_calibration_hits_capacities():
    spec = next(s for s in QUICK_SPECS if s.name == "mor-4")
    cfg = model_config(QUICK_SHAPE, spec)
    model = random_model(cfg, seed=3, std=1.5 / math.sqrt(cfg.hidden_size), device=torch.device("cpu"),
                         dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (64, 32), generator=gen)
    held_out = torch.randint(0, cfg.vocab_size, (64, 32), generator=gen)
    bias = calibrate_router_bias(model, calib)
    assert model.config.mor.router_bias == bias and len(bias) == 4
    with torch.no_grad():
        on_calib = [float(s.float().mean()) for s in reference_forward(model, calib).selected]
        on_held = [float(s.float().mean()) for s in reference_forward(model, held_out).selected]
    targets = [1.0, 0.75, 0.5, 0.25]
    assert on_calib == pytest.approx(targets, abs=1.5 / calib.numel())      # exact up to one token
    assert on_held == pytest.approx(targets, abs=0.06)


def test_hf_twin_has_the_same_logits():
    pytest.importorskip("transformers")
    from benchmarks.hf_peer import to_hf_llama

    spec = next(s for s in QUICK_SPECS if s.is_vanilla)
    cfg = model_config(QUICK_SHAPE, spec)
    model = random_model(cfg, seed=1, std=0.2, device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reference_forward(model, ids).logits
        theirs = to_hf_llama(model)(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# ---- serving.py statistics -------------------------------------------------------------------------
def test_percentiles_match_linear_interpolation():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert serving.percentile(values, 50) == 3.0
    assert serving.percentile(values, 0) == 1.0 and serving.percentile(values, 100) == 5.0
    assert serving.percentile(values, 99) == pytest.approx(4.96)
    assert serving.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        serving.percentile([], 50)
    stats = serving.describe([1.0, 2.0, 3.0, 10.0], [50, 99])
    assert stats == pytest.approx({"mean": 4.0, "p50": 2.5, "p99": 9.79})
    assert serving.describe([], [50]) == {"mean": None, "p50": None}


def test_request_timings_and_summary():
    # chunks at 0.1 s (first token), 0.3, 0.4; stream closed at 0.5; 5 tokens (one chunk held two).
    r = serving.timing_result([0.1, 0.3, 0.4], end=0.5, output_tokens=5, prompt_tokens=7)
    assert r.success and r.ttft == 0.1 and r.itl == pytest.approx([0.2, 0.1])
    assert r.tpot == pytest.approx((0.5 - 0.1) / 4)
    one = serving.timing_result([0.2], end=0.2, output_tokens=1, prompt_tokens=3)
    assert one.tpot is None and one.itl == []
    empty = serving.timing_result([], end=0.3, output_tokens=0, prompt_tokens=3)
    assert not empty.success
    failed = serving.RequestResult(success=False, error="HTTP 500: boom")
    s = serving.summarize([r, one, failed], duration=2.0, percentiles=[50, 99])
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 500: boom"]
    assert s["total_output_tokens"] == 6 and s["total_input_tokens"] == 10
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 8.0
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0) and s["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)                   # only r has two tokens or more
    assert s["itl_ms"]["p50"] == pytest.approx(150.0) and s["e2el_ms"]["p99"] == pytest.approx(497.0)
    assert "| TTFT | 150.00 | 150.00 |" in serving.markdown({"model": "m"}, s)


def test_poisson_delays():
    assert serving.poisson_delays(3, math.inf, 0) == [0.0, 0.0, 0.0]
    delays = serving.poisson_delays(4000, 20.0, seed=1)
    assert delays == serving.poisson_delays(4000, 20.0, seed=1)
    assert sum(delays) / len(delays) == pytest.approx(1 / 20, rel=0.06)


# ---- serving.py against server.py ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path) -> Path:
    from morserve.checkpoint import save_checkpoint
    from morserve.config import ModelConfig, MoRConfig
    from morserve.model import MoRModel
    from morserve.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_ids[0], mor=MoRConfig(num_recursions=3, router="expert"))
    return save_checkpoint(MoRModel(cfg).init_weights(seed=7, std=0.3).eval(), tok, path)


@pytest.mark.skipif(not (REPO / "server.py").is_file(), reason="server.py is not in the repository yet")
def test_serving_benchmark_against_real_server(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(REPO / "server.py"), "--model", str(ckpt), "--host", "127.0.0.1",
                             "--port", str(port), "--served-model-name", "tiny", "--device", "cpu",
                             "--num-kv-blocks", "4000", "--block-size", "4", "--api-key", "k",
                             "--log-level", "warning"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server.py did not become healthy"
            time.sleep(0.2)
        out = tmp_path / "serving.json"
        md = tmp_path / "serving.md"
        code = serving.main(["--base-url", url, "--model", "tiny", "--api-key", "k", "--num-prompts", "10",
                             "--request-rate", "50", "--max-concurrency", "4", "--input-len", "6",
                             "--output-len", "8", "--ignore-eos", "--json", str(out), "--markdown", str(md)])
        assert code == 0
        result = json.loads(out.read_text())
        s = result["summary"]
        assert s["completed"] == 10 and s["failed"] == 0
        assert s["total_output_tokens"] == 80 and s["total_input_tokens"] > 0   # from the stream's usage
        assert len(result["requests"]) == 10
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert 0 < s[key]["mean"] and s[key]["p50"] <= s[key]["p99"]
        assert s["ttft_ms"]["p99"] <= s["e2el_ms"]["p99"]
        assert "| successful requests | 10 |" in md.read_text()
    finally:
        proc.terminate()
        proc.wait(30)

