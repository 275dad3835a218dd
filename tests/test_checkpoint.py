"""Checkpoints: our format, the reference MoR code's layout and config, load_pretrained.

Reference-layout checkpoints are written here by hand, key by key, from random MoR models (every
recursion gets its own copy of the shared block), so the converter is checked against the
layout as documented rather than against itself."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import morserve.checkpoint.pretrained as pretrained
from morserve.checkpoint import (CheckpointError, convert_reference_checkpoint, load_checkpoint, load_pretrained,
                                 load_reference_checkpoint, parse_training_config, save_checkpoint)
from morserve.config import ConfigError, ModelConfig, MoRConfig
from morserve.model import MoRModel, reference_forward
from morserve.tokenizer import Tokenizer

HF_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (and contend on shared machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(router: str | None = "expert", sharing: str = "middle_cycle", nr: int = 3, block: int = 2,
               tied: bool = True, **mor) -> MoRModel:
    mor.setdefault("router_func", "softmax" if router == "token" else "sigmoid")
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=(2 if sharing == "middle_cycle" else 0) + block * nr,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=5000.0,
                      mor=MoRConfig(num_recursions=nr, sharing=sharing, router=router, **mor))
    return MoRModel(cfg).init_weights(int(torch.randint(0, 1 << 30, (1,))), std=0.3).eval()


def random_ids(model: MoRModel, batch: int = 3, length: int = 19) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length))


def assert_same_outputs(a: MoRModel, b: MoRModel) -> None:
    ids = random_ids(a)
    with torch.no_grad():
        ra, rb = reference_forward(a, ids), reference_forward(b, ids)
    assert torch.equal(ra.depths, rb.depths)
    assert torch.equal(ra.logits, rb.logits)


def converted_config(model: MoRModel) -> dict:
    """The model's config as converted from a training config, which states the expert capacities."""
    expected = model.config.to_dict()
    if model.config.mor.router == "expert":
        expected["mor"]["capacity"] = model.config.mor.capacities
    return expected


def assert_same_weights(a: MoRModel, b: MoRModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- our format ---------------------------------------------------------------------------------
OWN_CASES = {
    "expert-linear": dict(router="expert"),
    "expert-mlp-tanh-untied": dict(router="expert", router_type="mlp", router_func="tanh", tied=False, alpha=0.5),
    "token-bias-share-first": dict(router="token", router_bias=[0.0, 0.1, -0.1], kv_mode="share_first", alpha=0.7),
    "expert-cycle": dict(router="expert", sharing="cycle", nr=2),
    "vanilla": dict(router=None, nr=1, block=3),
}


@pytest.mark.parametrize("case", OWN_CASES)
def test_own_format_round_trip(case, tmp_path):
    model = make_model(**OWN_CASES[case])
    tok = Tokenizer.byte_level()
    save_checkpoint(model, tok, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json"}
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())   # block stored once
    loaded, loaded_tok = load_checkpoint(tmp_path)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert not loaded.training
    assert_same_weights(model, loaded)
    assert_same_outputs(model, loaded)
    assert loaded_tok.encode("héllo") == tok.encode("héllo") and loaded_tok.eos_token_ids == [257]


def test_own_format_dtypes_and_no_tokenizer(tmp_path):
    model = make_model()
    save_checkpoint(model, None, tmp_path, dtype=torch.bfloat16)
    loaded, tok = load_checkpoint(tmp_path)
    assert tok is None
    assert all(torch.equal(p, q.to(torch.bfloat16).float()) for p, q in zip(loaded.parameters(), model.parameters()))
    half, _ = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_own_format_errors_name_the_problem(tmp_path):
    model = make_model("token")
    save_checkpoint(model, None, tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))

    def rewrite(new_state):
        save_file(new_state, str(weights))
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path)
        return str(err.value)

    missing = dict(state)
    del missing["block.1.mlp.up_proj.weight"]
    assert "missing tensors: block.1.mlp.up_proj.weight" in rewrite(missing)
    assert "unexpected tensors: block.9.extra" in rewrite({**state, "block.9.extra": torch.zeros(2)})
    bad = {**state, "router.router.weight": torch.zeros(2, 32)}
    assert "router.router.weight is (2, 32), the config needs (3, 32)" in rewrite(bad)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mor"]["num_recursions"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_recursions = 5"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


# ---- the reference code's layout ----------------------------------------------------------------
def reference_state(model: MoRModel) -> dict[str, torch.Tensor]:
    """The model's weights in the reference code's key layout, each recursion with its own copy."""
    mor = model.config.mor
    nr, middle = mor.num_recursions, int(mor.sharing == "middle_cycle")
    expert = mor.router == "expert"
    mor_layer = "model.layers.1." if middle else "model.layers."       # token choice's MoR layer
    last = nr + 1 if expert else 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state.pop("embed_tokens.weight"), "model.norm.weight": state.pop("norm.weight")}
    out["lm_head.weight"] = state.pop("lm_head.weight", out["model.embed_tokens.weight"].clone())
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head == "prologue":
            out["model.layers.0." + rest.split(".", 1)[1]] = value
        elif head == "epilogue":
            out[f"model.layers.{last}." + rest.split(".", 1)[1]] = value
        elif head == "block":
            for r in range(nr):
                name = f"model.layers.{r + middle}.block.{rest}" if expert else f"{mor_layer}block_list.{r}.{rest}"
                out[name] = value.clone()
        elif head == "routers":
            r, rest = rest.split(".", 1)
            out[f"model.layers.{int(r) + middle}.mor_router.{rest}"] = value
        else:
            assert head == "router"
            out[f"{mor_layer}mor_router.{rest}"] = value
    if mor.router_bias is not None:                  # loss_free balancing: bias added to alpha * softmax
        out[f"{mor_layer}router_bias"] = torch.tensor(mor.router_bias) * mor.alpha
    return out


def training_config(model: MoRModel) -> dict:
    """A training config as the reference code writes it (model shape under model_config)."""
    cfg, mor = model.config, model.config.mor
    return {
        "name": "test_run", "wandb": True, "learning_rate": 3e-3, "model_name_or_path": "HuggingFaceTB/SmolLM-135M",
        "model_config": {k: getattr(cfg, k) for k in HF_SHAPE},
        "recursive": {"enable": True, "base_depth": None, "num_recursion": mor.num_recursions,
                      "sharing": mor.sharing, "ln_share": True, "initialization": "random"},
        "kv_sharing": {"enable": mor.kv_mode == "share_first", "base_depth": None, "num_recursion": None,
                       "sharing": None, "update_cache": False},
        "relaxation": {"enable": False, "method": "lora", "lora": {"r": 16}},
        "mor": {"enable": True, "type": mor.router, "capacity": ",".join(map(str, mor.capacities)),
                "rand_router": False, "router_type": mor.router_type, "z_loss": False, "z_coeff": 1e-3,
                "temp": mor.temp,
                "expert": {"cap_warmup_step": 0, "router_func": mor.router_func if mor.router == "expert" else "sigmoid",
                           "alpha": mor.alpha, "sampling": "aux_loss", "include_first": True, "coeff": 1e-3,
                           "gating": "weighted"},
                "token": {"bal_warmup_step": 0, "router_func": "softmax", "alpha": mor.alpha,
                          "balancing": "loss" if mor.router_bias is None else "loss_free", "coeff": 0.1, "u": 1e-3,
                          "gating": "weighted"}},
    }


def write_reference(model: MoRModel, folder, fmt: str = "safetensors", config_format: str = "yaml",
                    state: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    state = reference_state(model) if state is None else state
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    text = training_config(model)
    config = folder / f"train.{config_format}"
    config.write_text(yaml.safe_dump(text) if config_format == "yaml" else json.dumps(text))
    return config


REFERENCE_CASES = {
    "expert-middle": dict(router="expert"),
    "expert-middle-mlp-tanh-untied-kvshare": dict(router="expert", router_type="mlp", router_func="tanh", alpha=0.5,
                                                  tied=False, kv_mode="share_first", temp=2.0),
    "expert-cycle-nr2": dict(router="expert", sharing="cycle", nr=2, block=3),
    "token-middle": dict(router="token", alpha=1.0),
    "token-middle-loss-free": dict(router="token", alpha=0.5, router_bias=[0.0, 0.25, -0.125], nr=3),
    "token-cycle-mlp": dict(router="token", sharing="cycle", router_type="mlp", nr=2),
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_layout_round_trip(case, fmt, tmp_path):
    model = make_model(**REFERENCE_CASES[case])
    config_path = write_reference(model, tmp_path / "ref", fmt, "json" if fmt == "bin" else "yaml")
    loaded = load_reference_checkpoint(tmp_path / "ref", config_path)
    assert loaded.config.to_dict() == converted_config(model)
    assert_same_weights(model, loaded)
    assert_same_outputs(model, loaded)
    out = convert_reference_checkpoint(tmp_path / "ref", config_path, tmp_path / "ours", Tokenizer.byte_level())
    converted, tok = load_checkpoint(out)
    assert_same_outputs(model, converted)
    assert tok.decode(tok.encode("ß")) == "ß"
    assert_same_outputs(model, load_pretrained(tmp_path / "ref").model)


def test_reference_copies_may_be_deduplicated_and_rope_cache_ignored(tmp_path):
    model = make_model("expert", nr=3)
    state = reference_state(model)
    # HF's safetensors writer keeps one name per shared storage: drop some copies
    for key in [k for k in state if k.startswith(("model.layers.2.block.", "model.layers.3.block.0."))]:
        del state[key]
    del state["model.layers.1.block.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    del state["lm_head.weight"]
    config_path = write_reference(model, tmp_path, state=state)
    assert_same_outputs(model, load_reference_checkpoint(tmp_path, config_path))
    del state["model.layers.3.block.1.mlp.up_proj.weight"]          # now no copy is left
    config_path = write_reference(model, tmp_path, state=state)
    with pytest.raises(CheckpointError, match="missing tensors: block.1.mlp.up_proj.weight"):
        load_reference_checkpoint(tmp_path, config_path)


def test_reference_sharded_and_wrapped_weights(tmp_path):
    model = make_model("token", nr=2)
    state = reference_state(model)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(tmp_path / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(training_config(model)))
    assert_same_outputs(model, load_pretrained(tmp_path).model)
    wrapped = tmp_path / "deepspeed"
    wrapped.mkdir()
    torch.save({"module": {"module." + k: v for k, v in state.items()}}, wrapped / "pytorch_model.bin")
    assert_same_outputs(model, load_reference_checkpoint(wrapped / "pytorch_model.bin", tmp_path / "train.yaml"))


def test_distinct_attention_per_recursion_is_refused_as_issue_17(tmp_path):
    model = make_model("expert", nr=3)
    state = reference_state(model)
    for r in (2, 3):            # as trained by the reference code before its issue #17 was fixed
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"model.layers.{r}.block.0.self_attn.{proj}.weight"
            state[key] = state[key] + 0.01 * torch.randn_like(state[key])
    config_path = write_reference(model, tmp_path, state=state)
    with pytest.raises(CheckpointError) as err:
        load_reference_checkpoint(tmp_path, config_path)
    message = str(err.value)
    assert "attention weights of the shared block differ" in message and "issue #17" in message
    assert "block.0.self_attn.q_proj.weight recursion 1 vs 2" in message and "82c97f2" in message


def test_other_distinct_copies_are_refused(tmp_path):
    model = make_model("token", nr=2)
    state = reference_state(model)
    key = "model.layers.1.block_list.1.1.post_attention_layernorm.weight"
    state[key] = state[key] * 1.001
    config_path = write_reference(model, tmp_path, state=state)
    with pytest.raises(CheckpointError) as err:
        load_reference_checkpoint(tmp_path, config_path)
    assert "block.1.post_attention_layernorm.weight recursion 1 vs 2" in str(err.value)
    assert "issue #17" not in str(err.value)
    state[key] = state["model.layers.1.block_list.0.1.post_attention_layernorm.weight"] * (1 + 1e-7)
    config_path = write_reference(model, tmp_path, state=state)       # a rounding difference passes
    load_reference_checkpoint(tmp_path, config_path)


def test_reference_layout_errors_name_the_problem(tmp_path):
    model = make_model("expert", nr=2)

    def error_for(state=None, edit=None) -> str:
        config_path = write_reference(model, tmp_path, state=state)
        if edit is not None:
            text = yaml.safe_load(config_path.read_text())
            edit(text)
            config_path.write_text(yaml.safe_dump(text))
        with pytest.raises(CheckpointError) as err:
            load_reference_checkpoint(tmp_path, config_path)
        return str(err.value)

    state = reference_state(model)
    del state["model.layers.2.mor_router.router.weight"]
    assert "no router 'model.layers.2.mor_router'" in error_for(state)
    assert "unexpected tensors: block.0.extra" in error_for(
        {**reference_state(model), "model.layers.1.block.0.extra": torch.ones(1)})
    assert "does not explain: ['model.layers.9.mlp.up_proj.weight']" in error_for(
        {**reference_state(model), "model.layers.9.mlp.up_proj.weight": torch.ones(1)})
    state = reference_state(model)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    assert "lm_head.weight differs" in error_for(state)

    def more_layers(cfg):
        cfg["model_config"]["num_hidden_layers"] = 8
    assert "block layers ['0', '1'] per recursion, the config implies 3" in error_for(edit=more_layers)

    def expert_as_token(cfg):
        cfg["mor"]["type"] = "token"
    assert "no shared-block tensors" in error_for(edit=expert_as_token)


# ---- the training config ------------------------------------------------------------------------
def test_training_config_mapping():
    model = make_model("expert", nr=3, router_type="mlp", alpha=0.2, temp=1.5)
    cfg = training_config(model)
    assert parse_training_config(cfg).model.to_dict() == converted_config(model)
    cfg["mor"]["capacity"] = [1.0, 0.5, 0.25]
    cfg["mor"]["router_type"] = "wide_mlp"
    mor = parse_training_config(cfg).model.mor
    assert (mor.capacity, mor.router_type, mor.alpha, mor.temp) == ([1.0, 0.5, 0.25], "mlp", 0.2, 1.5)
    cfg["mor"]["capacity"] = "1.0,0.6,0.2"
    assert parse_training_config(cfg).model.mor.capacity == [1.0, 0.6, 0.2]
    # a flat HF-style config with overrides; shape from an HF config.json; layers that do not fill a
    # recursion are dropped as the reference code does
    flat = {"num_recursions": 2, "sharing": "cycle", "kv_sharing": True, "hidden_size": 48,
            "mor": {"type": "token", "token": {"alpha": 0.3}}}
    hf = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 7,
          "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False, "eos_token_id": 3}
    config = parse_training_config(flat, hf).model
    assert (config.hidden_size, config.num_hidden_layers, config.num_block_layers, config.eos_token_id) == (48, 6, 3, 3)
    assert (config.mor.router, config.mor.router_func, config.mor.alpha, config.mor.kv_mode, config.mor.capacity) == \
        ("token", "softmax", 0.3, "share_first", None)
    assert not config.tie_word_embeddings


REJECTED = {
    "relaxation": (lambda c: c["relaxation"].update(enable=True), "relaxation"),
    "sequence sharing": (lambda c: c["recursive"].update(sharing="middle_sequence"), "sharing 'middle_sequence'"),
    "unshared norms": (lambda c: c["recursive"].update(ln_share=False), "ln_share"),
    "random router": (lambda c: c["mor"].update(rand_router=True), "rand_router"),
    "aux router": (lambda c: c["mor"]["expert"].update(sampling="aux_router"), "aux_router"),
    "unweighted": (lambda c: c["mor"]["expert"].update(gating="unweighted"), "gating"),
    "no router func": (lambda c: c["mor"]["expert"].update(router_func=None), "router_func None"),
    "token sigmoid": (lambda c: c["mor"].update(type="token") or c["mor"]["token"].update(router_func="sigmoid"),
                      "token choice needs softmax"),
    "hybrid kv": (lambda c: c["kv_sharing"].update(enable=True, update_cache=True), "update_cache"),
    "no mor": (lambda c: c["mor"].update(enable=False), "mor is not enabled"),
    "one recursion": (lambda c: c["recursive"].update(num_recursion=1), "num_recursion must be"),
    "typo": (lambda c: c["mor"]["expert"].update(aplha=0.1), r"unknown key\(s\) \['aplha'\] in mor.expert"),
    "no shape": (lambda c: c.pop("model_config"), "HuggingFaceTB/SmolLM-135M under `model_config`"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_training_config_rejections(case):
    cfg = training_config(make_model("expert"))
    edit, message = REJECTED[case]
    edit(cfg)
    with pytest.raises(CheckpointError, match=message):
        parse_training_config(cfg)


# ---- load_pretrained ----------------------------------------------------------------------------
def test_load_pretrained_sources_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "MODELS_DIR", tmp_path / "models")
    with pytest.raises(CheckpointError, match="'morserve-mini-mor3' is missing from .*: this installation is incomplete, reinstall morserve"):
        load_pretrained("morserve-mini-mor3")
    model = make_model("expert")
    save_checkpoint(model, Tokenizer.byte_level(), tmp_path / "models" / "morserve-mini-mor3")
    loaded = load_pretrained("morserve-mini-mor3", dtype="auto")
    assert loaded.name == "morserve-mini-mor3" and loaded.tokenizer.vocab_size == 258
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert_same_outputs(model, loaded.model)
    half = load_pretrained(tmp_path / "models" / "morserve-mini-mor3", dtype="bfloat16")
    assert half.name == "morserve-mini-mor3" and {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be"):
        load_pretrained("morserve-mini-mor3", dtype="int7")
    with pytest.raises(CheckpointError, match="does not exist. Accepted: the names 'smollm2-135m-instruct'"):
        load_pretrained("gpt-5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a model this loader knows"):
        load_pretrained(tmp_path / "empty")
    config_path = write_reference(model, tmp_path / "ref")
    (tmp_path / "ref" / "other.yaml").write_text(config_path.read_text())
    with pytest.raises(CheckpointError, match=r"exactly one training config .*\['other.yaml', 'train.yaml'\]"):
        load_pretrained(tmp_path / "ref")


# ---- Hugging Face Llama directories ----------------------------------------------------------------
def _hf_names(state: dict, num_layers: int) -> dict:
    """Our vanilla-layout names -> HF Llama names (the inverse of the loader's mapping, spelled out)."""
    out = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in ("prologue", "block", "epilogue"):
            index, _, rest = rest.partition(".")
            layer = {"prologue": 0, "epilogue": num_layers - 1}.get(part, int(index) + 1)
            out[f"model.layers.{layer}.{rest}"] = value
        elif part in ("embed_tokens", "norm"):
            out[f"model.{key}"] = value
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_llama_directory_loads_as_a_vanilla_model(tmp_path, sharded):
    cfg = ModelConfig(vocab_size=90, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    original = MoRModel(cfg).init_weights(seed=int(torch.randint(0, 1 << 30, (1,))), std=0.3).eval()
    hf = _hf_names(original.state_dict(), cfg.num_hidden_layers)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)       # some versions saved it
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
              "vocab_size": 90, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
              "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in hf.items()}
    if sharded:
        keys = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in halves.items():
            save_file({k: tensors[k] for k in part}, str(tmp_path / name))
        index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = load_pretrained(tmp_path).model
    assert loaded.config.mor.num_recursions == 1 and not loaded.config.tie_word_embeddings
    ids = torch.randint(0, 90, (2, 11))
    with torch.no_grad():
        assert torch.equal(reference_forward(loaded, ids).logits, reference_forward(original, ids).logits)

    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act"):
        load_pretrained(tmp_path)
    config.update(hidden_act="silu", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        load_pretrained(tmp_path)
