"""morserve: an inference serving engine for Mixture-of-Recursions language models."""

__version__ = "0.1.0"

from morserve.engine import LLM, AsyncLLMEngine, EngineArgs, LLMEngine, RequestOutput, SamplingParams  # noqa: E402

__all__ = ["LLM", "AsyncLLMEngine", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams"]
