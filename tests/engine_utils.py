"""Shared helpers for engine tests: tiny random MoR models and the reference-forward oracle."""

from __future__ import annotations

import pytest
import torch

from morserve.config import ModelConfig, MoRConfig
from morserve.engine import LLMEngine, RequestOutput
from morserve.model import MoRModel, reference_forward

LAYERS_FOR_NR = {1: 4, 2: 8, 3: 8, 4: 10}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for a module's tests (import it into a test module to apply it there)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)

TIE_TOL = 1e-4


def tiny_model(router: str | None = "expert", kv_mode: str = "recursion", nr: int = 3,
               seed: int = 0, vocab: int = 97, std: float = 0.3) -> MoRModel:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=LAYERS_FOR_NR[nr], num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=None,
                      mor=MoRConfig(num_recursions=nr, router=router, kv_mode=kv_mode,
                                    router_func="softmax" if router == "token" else "sigmoid"))
    return MoRModel(cfg).init_weights(seed, std=std).eval()


def run_to_completion(engine: LLMEngine, arrivals: dict[int, list[tuple]] | None = None,
                      max_ticks: int = 100_000) -> dict[str, RequestOutput]:
    """Step until idle; `arrivals[tick]` lists (request_id, prompt, params) added before that tick."""
    arrivals = dict(arrivals or {})
    finished: dict[str, RequestOutput] = {}
    tick = 0
    while engine.has_unfinished_requests() or arrivals:
        for args in arrivals.pop(tick, []):
            engine.add_request(*args)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        tick += 1
        assert tick < max_ticks, "engine did not finish"
    return finished


def _near_tie_token(logits: torch.Tensor) -> bool:
    top = logits.float().topk(2).values
    return float(top[0] - top[1]) < TIE_TOL


def _near_tie_depth(model: MoRModel, ref, pos: int, router_threshold: float | None = None) -> bool:
    mor = model.config.mor
    if mor.router == "expert":
        thr = mor.routing_threshold if router_threshold is None else router_threshold
        bias = mor.router_bias or [0.0] * mor.num_recursions
        acts = [torch.sigmoid(r[pos].float() + b) if mor.router_func == "sigmoid" else torch.tanh(r[pos].float() + b)
                for r, b in zip(ref.router_logits[1:], bias[1:])]
        return any(abs(float(a) - thr) < TIE_TOL for a in acts)
    if mor.router == "token":
        return _near_tie_token(torch.softmax(ref.router_logits[0][pos].float(), -1))
    return False


def check_against_reference(model: MoRModel, prompt: list[int], out_tokens: list[int],
                            out_depths: list[int], max_depth: int | None = None,
                            router_threshold: float | None = None) -> int:
    """Teacher-forced comparison of greedy tokens and depths with the dense reference forward
    (with the request's depth overrides, if any). Returns how many positions differed only at a
    numerical near-tie (the test bounds this); any other difference fails."""
    assert len(out_tokens) == len(out_depths)
    full = torch.tensor(prompt + out_tokens)
    with torch.no_grad():
        ref = reference_forward(model, full, max_depth=max_depth, router_threshold=router_threshold)
    ties = 0
    p = len(prompt)
    for i, (tok, depth) in enumerate(zip(out_tokens, out_depths)):
        pos = p - 1 + i
        want = int(ref.logits[pos].argmax())
        if tok != want:
            assert _near_tie_token(ref.logits[pos]), f"token {i}: engine {tok}, reference {want}"
            ties += 1
        if depth != int(ref.depths[pos]):
            assert _near_tie_depth(model, ref, pos, router_threshold), f"depth {i}: engine {depth}, reference {int(ref.depths[pos])}"
            ties += 1
    return ties
