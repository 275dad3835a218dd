"""Checkpoints: our format, the reference MoR code's key layout (written here by hand), errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from morserve.checkpoint import (CheckpointError, config_from_training_yaml, load_checkpoint, load_pretrained,
                                 save_checkpoint)
from morserve.config import ModelConfig, MoRConfig
from morserve.model import MoRModel, reference_forward
from morserve.tokenizer import Tokenizer


def random_model(router="expert", nr=3, layers=8, sharing="middle_cycle", kv_mode="recursion", tied=True):
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      mor=MoRConfig(num_recursions=nr, router=router, sharing=sharing, kv_mode=kv_mode,
                                    router_func="softmax" if router == "token" else "sigmoid"))
    return MoRModel(cfg).init_weights(int(torch.randint(0, 1 << 30, (1,))), std=0.3)


def same_function(a: MoRModel, b: MoRModel) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 17))
    with torch.no_grad():
        ra, rb = reference_forward(a, ids), reference_forward(b, ids)
    assert torch.equal(ra.logits, rb.logits) and torch.equal(ra.depths, rb.depths)


@pytest.mark.parametrize("router", ["expert", "token", None])
def test_own_format_round_trip(tmp_path, router):
    model = random_model(router, tied=router != "token")
    tok = Tokenizer.byte_level(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    save_checkpoint(model, tok, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    loaded, tok2 = load_checkpoint(tmp_path)
    same_function(model, loaded)
    assert tok2.encode("héllo") == tok.encode("héllo") and tok2.eos_token_ids == [257]
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    assert load_pretrained(tmp_path).model.config == model.config


def test_shared_block_is_stored_once(tmp_path):
    model = random_model("expert", nr=3)
    save_checkpoint(model, None, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("block.0.self_attn.q_proj") for k in keys) == 1


def test_bad_checkpoints_name_the_problem(tmp_path):
    model = random_model()
    save_checkpoint(model, None, tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}
    state["extra.weight"] = torch.zeros(2)
    state["embed_tokens.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['norm.weight'\].*unexpected tensors \['extra.weight'\].*embed_tokens.weight"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a morserve checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model 'no-such-model'"):
        load_pretrained("no-such-model")


# ---- the reference MoR code's layout, written by hand ---------------------------------------------
def write_reference_layout(model: MoRModel, folder, fmt: str, distinct: bool = False) -> None:
    """Keys exactly as the reference code names them (one block copy per recursion)."""
    cfg, nr = model.config, model.config.mor.num_recursions
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    token = cfg.mor.router == "token"
    last = 2 if token else nr + 1
    for k, v in sd.items():
        if k.startswith("prologue.0."):
            out["model.layers.0." + k[11:]] = v
        elif k.startswith("epilogue.0."):
            out[f"model.layers.{last}." + k[11:]] = v
        elif k.startswith("block."):
            for r in range(nr):
                key = f"model.layers.1.block_list.{r}.{k[6:]}" if token else f"model.layers.{r + 1}.block.{k[6:]}"
                copy = v.clone()
                if distinct and r == 1 and "q_proj" in k:
                    copy += 0.01
                out[key] = copy
        elif k.startswith("routers."):
            r, rest = k[8:].split(".", 1)
            out[f"model.layers.{int(r) + 1}.mor_router.{rest}"] = v
        elif k.startswith("router."):
            out["model.layers.1.mor_router." + k[7:]] = v
    if fmt == "bin":
        torch.save(out, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    training_cfg = {
        "model_config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "tie_word_embeddings")},
        "recursive": {"enable": True, "sharing": "middle_cycle", "num_recursion": nr},
        "mor": {"enable": True, "type": cfg.mor.router, "router_type": "linear", "temp": 1.0,
                "capacity": ",".join(str(c) for c in cfg.mor.capacities),
                "expert": {"router_func": "sigmoid", "alpha": 0.1, "sampling": "aux_loss"},
                "token": {"alpha": 0.1, "balancing": "loss"}},
        "kv_sharing": {"enable": False},
    }
    (folder / "train.yaml").write_text(yaml.safe_dump(training_cfg))


@pytest.mark.parametrize("router, fmt", [("expert", "bin"), ("expert", "safetensors"), ("token", "bin")])
def test_reference_layout_loads_to_the_same_model(tmp_path, router, fmt):
    model = random_model(router, nr=3)
    write_reference_layout(model, tmp_path, fmt)
    loaded = load_pretrained(tmp_path).model
    assert loaded.config.mor.router == router and loaded.config.mor.num_recursions == 3
    same_function(model, loaded)


def test_reference_layout_with_distinct_copies_is_refused(tmp_path):
    model = random_model("expert", nr=3)
    write_reference_layout(model, tmp_path, "safetensors", distinct=True)
    with pytest.raises(CheckpointError, match=r"issue #17.*self_attn.q_proj.weight \(recursion 1 vs 2"):
        load_pretrained(tmp_path)


def test_training_yaml_mapping(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 10,
                                "num_attention_heads": 4, "vocab_size": 100,
                                "recursive": {"sharing": "middle_cycle", "num_recursion": 4},
                                "mor": {"type": "expert", "capacity": [1.0, 0.75, 0.5, 0.25],
                                        "expert": {"router_func": "tanh", "alpha": 0.5}},
                                "kv_sharing": {"enable": True}}))
    cfg = config_from_training_yaml(path)
    assert (cfg.mor.num_recursions, cfg.mor.router_func, cfg.mor.alpha, cfg.mor.kv_mode) == (4, "tanh", 0.5, "share_first")
    assert cfg.num_block_layers == 2
    path.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 10,
                                "num_attention_heads": 4, "vocab_size": 100,
                                "recursive": {"sharing": "middle_sequence", "num_recursion": 4}}))
    with pytest.raises(CheckpointError, match="middle_sequence"):
        config_from_training_yaml(path)


# ---- tokenizer -----------------------------------------------------------------------------------
def test_byte_level_tokenizer_round_trips_any_text(tmp_path):
    tok = Tokenizer.byte_level()
    text = "Hello, wörld! ✓ 日本語 \n\t tabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == ids    # byte-level: no BOS by default
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.decode(again.encode(text)) == text and again.bos_token_id == 256
    assert tok.decode([256, 104, 105, 257]) == "hi" and tok.decode([256, 104], skip_special_tokens=False) == "<s>h"


def test_chat_template_errors_are_value_errors():
    tok = Tokenizer.byte_level(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.byte_level().apply_chat_template([{"role": "user", "content": "x"}])
