"""Llama-architecture GGUF files (e.g. SmolLM2-135M-Instruct Q4_1): dequantize every tensor to
float32, undo llama.cpp's Q/K row permutation (GGUF stores RoPE pairs interleaved; our model uses
the Hugging Face half-rotation layout), rebuild the byte-level BPE tokenizer from the GGUF vocab
and merges, and read the chat template. The result is a vanilla MoR model (Nr = 1, no router)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from morserve.checkpoint.own import CheckpointError, load_state_dict_into
from morserve.config import ModelConfig, MoRConfig
from morserve.model.mor import MoRModel
from morserve.tokenizer import Tokenizer

TOKEN_TYPE_CONTROL = 3
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permutation: per head, rows (i, pair) -> (pair, i)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_config(reader: GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    g = lambda key, default=None: _field(reader, f"llama.{key}", default)   # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    rope_dim = g("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise CheckpointError(f"partial RoPE (rope.dimension_count={rope_dim}) is not supported")
    return ModelConfig(
        vocab_size=int(g("vocab_size", len(tokens.data))), hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(g("attention.head_count_kv", heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(g("context_length", 2048)), tie_word_embeddings=not has_output,
        mor=MoRConfig(num_recursions=1, router=None, sharing="middle_cycle")).validate()


def _our_name(gguf_name: str, num_layers: int) -> str:
    if gguf_name == "token_embd.weight":
        return "embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, idx, kind, _ = gguf_name.split(".")
    i = int(idx)
    prefix = "prologue.0" if i == 0 else "epilogue.0" if i == num_layers - 1 else f"block.{i - 1}"
    if kind not in LAYER_NAMES:
        raise CheckpointError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{prefix}.{LAYER_NAMES[kind]}.weight"


def gguf_state_dict(reader: GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise CheckpointError("GGUF with rope_freqs (RoPE scaling) is not supported")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(x) for x in reversed(t.shape.tolist())])
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        state[_our_name(t.name, config.num_hidden_layers)] = w
    return state


def gguf_tokenizer(reader: GGUFReader) -> Tokenizer:
    """Byte-level BPE from tokenizer.ggml.{tokens, merges, token_type}; digits split one by one
    (SmolLM's pre-tokenizer) before the GPT-2 regex."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"only GPT-2 style BPE GGUF tokenizers are supported, got {model!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=False))
    split_digits = _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "qwen2", "llama3")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
    template = _field(reader, "tokenizer.chat_template")
    eos = [tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]]
    # chat models end their turns with the template's end-of-turn token
    for end_of_turn in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if template and end_of_turn in template and end_of_turn in tokens and end_of_turn not in eos:
            eos.insert(0, end_of_turn)
    if "<|endoftext|>" in tokens and "<|endoftext|>" not in eos:
        eos.append("<|endoftext|>")
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    return Tokenizer(backend, bos_token=tokens[int(bos_id)] if bos_id is not None else None,
                     eos_tokens=eos, chat_template=template, add_bos_token=False)


def load_gguf(path: str | Path) -> tuple[MoRModel, Tokenizer]:
    """A float32 vanilla MoRModel and its tokenizer from a Llama GGUF file."""
    reader = GGUFReader(str(path))
    config = gguf_config(reader)
    tokenizer = gguf_tokenizer(reader)
    config.eos_token_id = tokenizer.eos_token_ids
    config.bos_token_id = tokenizer.bos_token_id
    model = MoRModel(config)
    load_state_dict_into(model, gguf_state_dict(reader, config), str(path))
    return model.eval(), tokenizer
