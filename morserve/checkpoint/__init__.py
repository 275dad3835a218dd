"""Checkpoints: our format (own), the reference MoR code's layout (reference_config + reference_mor),
Llama GGUF files (gguf_llama), Hugging Face Llama directories (hf_llama), and `load_pretrained` for
every source by name or path."""

from morserve.checkpoint.gguf_llama import load_gguf
from morserve.checkpoint.hf_llama import load_hf_llama
from morserve.checkpoint.own import load_checkpoint, save_checkpoint
from morserve.checkpoint.pretrained import (DEFAULT_MODEL_NAME, SMOLLM2_NAME, Pretrained, load_pretrained,
                                            resolve_dtype, smollm2_gguf_path)
from morserve.checkpoint.reference_config import ReferenceConfig, load_training_config, parse_training_config
from morserve.checkpoint.reference_mor import (convert_reference_checkpoint, convert_state_dict,
                                               load_reference_checkpoint, read_weights)
from morserve.checkpoint.state import CheckpointError, build_model

__all__ = ["CheckpointError", "DEFAULT_MODEL_NAME", "Pretrained", "ReferenceConfig", "SMOLLM2_NAME", "build_model",
           "convert_reference_checkpoint", "convert_state_dict", "load_checkpoint", "load_gguf", "load_hf_llama", "load_pretrained",
           "load_reference_checkpoint", "load_training_config", "parse_training_config", "read_weights",
           "resolve_dtype", "save_checkpoint", "smollm2_gguf_path"]
