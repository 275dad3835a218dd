"""Checkpoints: our format, the reference MoR code's layout, GGUF; `load_pretrained` for all."""

from morserve.checkpoint.gguf_llama import load_gguf
from morserve.checkpoint.own import CheckpointError, load_checkpoint, save_checkpoint
from morserve.checkpoint.pretrained import DEFAULT_MODEL_NAME, SMOLLM2_NAME, Pretrained, load_pretrained
from morserve.checkpoint.reference_mor import config_from_training_yaml, convert_state_dict, load_reference_checkpoint

__all__ = ["CheckpointError", "DEFAULT_MODEL_NAME", "Pretrained", "SMOLLM2_NAME", "config_from_training_yaml",
           "convert_state_dict", "load_checkpoint", "load_gguf", "load_pretrained", "load_reference_checkpoint",
           "save_checkpoint"]
