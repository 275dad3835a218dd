"""Model configuration: Hugging Face Llama fields plus a `mor` section, as dataclasses <-> JSON.

`ModelConfig.from_dict` accepts a Hugging Face Llama `config.json` (which has no `mor` section:
that is a vanilla model, one recursion, no router) or our own format; `validate()` names every
inconsistency it finds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SHARINGS = ("middle_cycle", "cycle", "middle_sequence", "sequence")
BLOCK_SHARINGS = ("middle_cycle", "cycle")      # a recursion is one pass of the shared block
SEQUENCE_SHARINGS = ("middle_sequence", "sequence")  # each shared layer runs Nr times in a row
ROUTERS = ("expert", "token")
ROUTER_FUNCS = ("sigmoid", "tanh", "softmax")
ROUTER_TYPES = ("linear", "mlp")
KV_MODES = ("recursion", "share_first")


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model."""


@dataclass
class MoRConfig:
    """The recursion part of the model.

    num_recursions: Nr, the most times the shared block is applied.
    sharing: how the shared layers are laid out (paper, section 2.1). `cycle`: the block of B
        layers runs Nr times (b0 b1 b0 b1 ...); `sequence`: each of the B layers runs Nr times in
        a row (b0 b0 b1 b1 ...); the `middle_` variants add a unique first and last layer. Only
        the cycle layouts have a recursion that is one pass of a block, so routing needs them;
        sequence layouts are fixed-depth (router None) recursive models, served as vanilla ones.
    router: `expert` (one d->1 router per recursion), `token` (one d->Nr router), or None
        (every token takes every recursion, ungated: a plain recursive / vanilla Transformer).
    router_func: `sigmoid` or `tanh` for expert choice, `softmax` for token choice.
    router_type: `linear` or `mlp` (Linear d->2d, GELU, Linear 2d->out; no biases).
    alpha: scale of the router weight that gates the block's output.
    capacity: expert choice, fraction of tokens that take each recursion during training
        (top-k). None: the paper's schedule (Nr-i)/Nr; a list: one fraction per recursion; a
        scalar keep ratio k: geometric, recursion r+1 takes k^r of the tokens (each recursion
        keeps the top k of those that took the previous one).
    threshold: expert choice at inference: a token takes recursion r>1 iff its router
        activation is >= threshold (default 0.5 for sigmoid, 0.0 for tanh).
    kv_mode: `recursion` (depth-r K/V only for tokens that took r) or `share_first`
        (block K/V computed at recursion 1 only and reused by deeper recursions).
    router_bias: one per recursion, added to the routing scores for the decision only (token
        choice: before the argmax; expert choice: to the raw score before the threshold).
    temp: router input temperature (the router sees h / temp).
    """

    num_recursions: int = 1
    sharing: str = "middle_cycle"
    router: str | None = None
    router_func: str = "sigmoid"
    router_type: str = "linear"
    alpha: float = 0.1
    capacity: float | list[float] | None = None
    threshold: float | None = None
    kv_mode: str = "recursion"
    router_bias: list[float] | None = None
    temp: float = 1.0

    @property
    def capacities(self) -> list[float]:
        n = self.num_recursions
        if isinstance(self.capacity, (int, float)) and not isinstance(self.capacity, bool):
            return [float(self.capacity) ** i for i in range(n)]
        if self.capacity is not None:
            return list(self.capacity)
        return [(n - i) / n for i in range(n)]

    @property
    def routing_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 0.0 if self.router_func == "tanh" else 0.5


@dataclass
class ModelConfig:
    """A Llama-style decoder laid out as prologue / shared recursion block / epilogue."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    mor: MoRConfig = field(default_factory=MoRConfig)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.mor, dict):
            self.mor = mor_from_dict(self.mor)

    # ---- layer layout -------------------------------------------------------------------
    @property
    def num_prologue_layers(self) -> int:
        return 1 if self.mor.sharing.startswith("middle_") else 0

    @property
    def num_epilogue_layers(self) -> int:
        return 1 if self.mor.sharing.startswith("middle_") else 0

    @property
    def num_block_layers(self) -> int:
        shared = self.num_hidden_layers - self.num_prologue_layers - self.num_epilogue_layers
        return shared // self.mor.num_recursions

    @property
    def num_unique_layers(self) -> int:
        return self.num_prologue_layers + self.num_block_layers + self.num_epilogue_layers

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first problem; return self when the config is valid."""
        m = self.mor
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")
        if not isinstance(m.num_recursions, int) or m.num_recursions < 1:
            raise ConfigError(f"mor.num_recursions must be an integer >= 1, got {m.num_recursions!r}")
        if m.sharing not in SHARINGS:
            raise ConfigError(f"mor.sharing must be one of {SHARINGS}, got {m.sharing!r}")
        if m.router not in ROUTERS + (None,):
            raise ConfigError(f"mor.router must be one of {ROUTERS} or null, got {m.router!r}")
        if m.router is not None and m.sharing in SEQUENCE_SHARINGS:
            raise ConfigError(
                f"{m.sharing} sharing cannot be routed: it applies each shared layer Nr times in a row, "
                f"so there is no block whose passes a token could stop after; route with "
                f"{' or '.join(BLOCK_SHARINGS)}, or use router null (a fixed-depth recursive model)")
        if m.router_type not in ROUTER_TYPES:
            raise ConfigError(f"mor.router_type must be one of {ROUTER_TYPES}, got {m.router_type!r}")
        if m.kv_mode not in KV_MODES:
            raise ConfigError(f"mor.kv_mode must be one of {KV_MODES}, got {m.kv_mode!r}")
        if m.router == "expert" and m.router_func not in ("sigmoid", "tanh"):
            raise ConfigError(f"expert-choice routing needs router_func sigmoid or tanh, got {m.router_func!r}")
        if m.router == "token" and m.router_func != "softmax":
            raise ConfigError(f"token-choice routing needs router_func softmax, got {m.router_func!r}")
        fixed = self.num_prologue_layers + self.num_epilogue_layers
        shared = self.num_hidden_layers - fixed
        if shared < m.num_recursions or shared % m.num_recursions:
            what = "(L-2)" if fixed else "L"
            raise ConfigError(
                f"{m.sharing} sharing needs {what} = {shared} to be a positive multiple of "
                f"num_recursions = {m.num_recursions} (num_hidden_layers = {self.num_hidden_layers})")
        if isinstance(m.capacity, (int, float)) and not 0 < m.capacity <= 1:
            raise ConfigError(f"mor.capacity as a keep ratio must be in (0, 1], got {m.capacity}")
        caps = m.capacities
        if len(caps) != m.num_recursions or not all(0 < c <= 1 for c in caps):
            raise ConfigError(f"mor.capacity must list {m.num_recursions} fractions in (0, 1], got {caps}")
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(f"mor.capacity must not increase with depth (routing is nested), got {caps}")
        if m.router_bias is not None and len(m.router_bias) != m.num_recursions:
            raise ConfigError(f"mor.router_bias must have {m.num_recursions} entries, got {len(m.router_bias)}")
        if m.temp <= 0:
            raise ConfigError(f"mor.temp must be positive, got {m.temp}")
        for tid in [self.bos_token_id, self.pad_token_id, *self.eos_token_ids]:
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ConfigError(f"special token id {tid} is outside the vocabulary (size {self.vocab_size})")
        return self

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["architectures"] = ["MoRLlamaForCausalLM"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        missing = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads"} - kwargs.keys()
        if missing:
            raise ConfigError(f"config is missing required field(s): {sorted(missing)}")
        if data.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {data['rope_scaling']!r} is not supported")
        kwargs["mor"] = mor_from_dict(data.get("mor") or {})
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def mor_from_dict(data: dict[str, Any]) -> MoRConfig:
    """Build a MoRConfig, rejecting unknown keys so that typos do not pass silently."""
    known = {f.name for f in fields(MoRConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in mor section: {sorted(unknown)}; known: {sorted(known)}")
    return MoRConfig(**data)
