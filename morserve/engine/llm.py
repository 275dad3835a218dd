"""Offline, vLLM-shaped API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence as Seq

from tqdm.auto import tqdm

from morserve.engine.args import EngineArgs
from morserve.engine.llm_engine import LLMEngine
from morserve.engine.outputs import RequestOutput
from morserve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """All EngineArgs are accepted as keyword arguments (model, batching, max_num_seqs, ...)."""

    def __init__(self, model=EngineArgs.model, **kwargs) -> None:
        self.engine = LLMEngine.from_args(EngineArgs(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs are in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, dataclasses.replace(p, output_kind="final_only"))
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        show = len(prompts) >= 16 if use_tqdm is None else use_tqdm
        with tqdm(total=len(prompts), desc="requests", disable=not show) as bar:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in ids:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[rid] for rid in ids]
