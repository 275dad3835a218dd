"""The engine: continuous depth-wise batching over a paged recursion-wise KV cache."""

from morserve.engine.args import EngineArgs
from morserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from morserve.engine.llm import LLM
from morserve.engine.llm_engine import LLMEngine, TickStats
from morserve.engine.outputs import CompletionOutput, RequestOutput
from morserve.engine.request_failures import RequestFailedError
from morserve.engine.sampling_params import ParamError, SamplingParams

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineDeadError", "EngineArgs", "LLM", "LLMEngine", "ParamError",
           "RequestFailedError", "RequestOutput", "SamplingParams", "TickStats"]
