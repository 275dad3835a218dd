"""Llama-architecture GGUF files (e.g. SmolLM2-135M-Instruct, Q4_1) -> vanilla MoRModel + Tokenizer.

- Hyperparameters from the `llama.*` metadata; the model is Nr = 1, no router, middle_cycle:
  layer 0 the prologue, layers 1..L-2 the block, layer L-1 the epilogue.
- Every tensor is dequantized to float32 with the gguf library (Q4_1, Q8_0, K-quants, F16, ...).
- llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE works on interleaved
  pairs; our model rotates halves (the HF layout), so the permutation is undone.
- The tokenizer is rebuilt from `tokenizer.ggml.{tokens,merges,token_type}` as a GPT-2 byte-level
  BPE with the `tokenizers` library. The pre-tokenizer follows `tokenizer.ggml.pre`: `gpt-2` is
  the GPT-2 regex; `smollm` (and the llama.cpp types sharing its rules, e.g. `starcoder`) splits
  every digit on its own first, exactly like SmolLM2's tokenizer.json. Other types are refused
  rather than tokenized differently from the original. BOS/EOS/EOT ids, add_bos_token and the
  chat template come from the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.constants import TokenType
from gguf.quants import dequantize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from morserve.checkpoint.state import CheckpointError, build_model, vanilla_layer
from morserve.config import ModelConfig, MoRConfig
from morserve.model.mor import MoRModel
from morserve.tokenizer import Tokenizer

LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "lm_head.weight"}
# llama.cpp pre-tokenizer types whose regex is GPT-2's preceded by splitting every digit (\p{N})
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
GPT2_PRE = ("gpt-2",)


def _get(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K permutation: within each head, row 2i+h (interleaved pairs)
    goes back to row h*D/2+i (halves), for a [num_heads * D, in] weight."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_config(reader: GGUFReader) -> ModelConfig:
    """ModelConfig (vanilla: one recursion, no router) from the GGUF metadata."""
    arch = _get(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def g(key: str, default: Any = None) -> Any:
        return _get(reader, f"llama.{key}", default)

    if g("expert_count", 0):
        raise CheckpointError("mixture-of-experts GGUF models are not supported")
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", hidden // heads))
    if int(g("attention.value_length", head_dim)) != head_dim or int(g("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError("GGUF with partial RoPE or different key/value head sizes is not supported")
    if g("rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"RoPE scaling {g('rope.scaling.type')!r} is not supported")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return ModelConfig(
        vocab_size=int(embed.shape[1]), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)), head_dim=head_dim,
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(g("context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        mor=MoRConfig(num_recursions=1, router=None, sharing="middle_cycle")).validate()


def _our_name(gguf_name: str, num_layers: int) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LAYER_TENSORS or parts[3] != "weight":
        raise CheckpointError(f"GGUF tensor {gguf_name!r} has no place in a Llama model")
    return f"{vanilla_layer(int(parts[1]), num_layers)}.{LAYER_TENSORS[parts[2]]}.weight"


def gguf_state_dict(reader: GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, in MoRModel names and the HF RoPE row layout."""
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise CheckpointError("GGUF with rope_freqs (scaled RoPE) is not supported")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy: the file is mapped read-only
        w = w.reshape([int(n) for n in reversed(t.shape.tolist())])
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        state[_our_name(t.name, config.num_hidden_layers)] = w
    return state


def gguf_tokenizer(reader: GGUFReader) -> Tokenizer:
    """The byte-level BPE tokenizer, special tokens and chat template stored in the GGUF."""
    kind, pre = _get(reader, "tokenizer.ggml.model"), _get(reader, "tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise CheckpointError(f"only GPT-2 style BPE GGUF tokenizers are supported, got {kind!r}")
    if pre not in DIGIT_SPLIT_PRE + GPT2_PRE:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {DIGIT_SPLIT_PRE + GPT2_PRE})")
    tokens: list[str] = _get(reader, "tokenizer.ggml.tokens")
    types: list[int] = _get(reader, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _get(reader, "tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if pre in DIGIT_SPLIT_PRE else byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([t for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    backend.add_tokens([t for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED])
    ends = [_get(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(tokens[int(i)] for i in ends if i is not None))
    bos_id = _get(reader, "tokenizer.ggml.bos_token_id")
    return Tokenizer(backend, bos_token=None if bos_id is None else tokens[int(bos_id)], eos_tokens=eos,
                     chat_template=_get(reader, "tokenizer.chat_template"),
                     add_bos_token=bool(_get(reader, "tokenizer.ggml.add_bos_token", False)))


def load_gguf(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[MoRModel, Tokenizer]:
    """A vanilla MoRModel (float32 dequantized weights, cast to dtype) and its tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    reader = GGUFReader(str(path))
    config = gguf_config(reader)
    tokenizer = gguf_tokenizer(reader)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_ids
    pad = _get(reader, "tokenizer.ggml.padding_token_id")
    config.pad_token_id = None if pad is None else int(pad)
    return build_model(config.validate(), gguf_state_dict(reader, config), str(path), device, dtype), tokenizer
