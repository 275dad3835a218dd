"""Output processing: sampled tokens onto their sequences, the stop rules (EOS, stop token ids,
stop strings, min_tokens, max_tokens, the context), finishing, and RequestOutputs. One set of
stop rules (`token_end`) serves the per-token path and the decode loop's bursts."""

from __future__ import annotations

import logging
from typing import Callable

from morserve.engine.outputs import CompletionOutput, RequestOutput
from morserve.engine.sampler import Sampled
from morserve.engine.sampling_params import SamplingParams
from morserve.engine.sequence import Request, Sequence, SeqStatus

logger = logging.getLogger(__name__)


def finish(seq: Sequence, reason: str, stop: int | str | None) -> None:
    seq.status = SeqStatus.FINISHED
    seq.finish_reason, seq.stop_reason = reason, stop


class OutputProcessor:
    """`retire(seq)` is called for every sequence that finished (the engine frees it)."""

    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int,
                 retire: Callable[[Sequence], None]) -> None:
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self.retire = retire

    def append_token(self, seq: Sequence, result: Sampled | None, depth: int) -> None:
        """One sampled token (None: nothing left to sample, the sequence fails alone)."""
        if result is None:      # non-finite logits: fail this sequence only
            logger.error("request %s: no finite logit to sample from; aborting its sequence %d",
                         seq.request.request_id, seq.index)
            finish(seq, "abort", None)
        else:
            seq.token_ids.append(result.token)
            seq.depths.append(depth)
            seq.cumulative_logprob += result.logprob
            if result.top is not None:
                seq.logprobs.append(result.top)
            self._check_stop(seq, result.token)
        self._retire_if_finished(seq)

    def append_burst(self, seq: Sequence, tokens: list[int], depths: list[int], logprobs: list[float]) -> int:
        """The decode loop's tokens for one sequence, in order, up to its first stop (EOS, a stop
        token id, max_tokens, the context), with the stop rules of token_end; the rest are
        dropped. Stop strings need the text after every token: those go one by one. A -2 marks a
        row that had no finite logit: the sequence fails there. Returns how many tokens were kept."""
        params = seq.request.params
        with_top = params.logprobs == 0
        failed = next((i for i, token in enumerate(tokens) if token < 0), None)
        if failed is not None:
            tokens, depths, logprobs = tokens[:failed], depths[:failed], logprobs[:failed]
        if params.stop:
            kept = 0
            for token, depth, logprob in zip(tokens, depths, logprobs):
                if seq.finished:
                    break
                self.append_token(seq, Sampled(token, logprob, {token: logprob} if with_top else None), depth)
                kept += 1
        else:
            kept = self._append_checked(seq, tokens, depths, logprobs, with_top)
        if failed is not None and not seq.finished:
            self.append_token(seq, None, 0)
        return kept

    def _append_checked(self, seq: Sequence, tokens: list[int], depths: list[int], logprobs: list[float],
                        with_top: bool) -> int:
        """Append tokens up to the first that ends the output (the rules of token_end without
        stop strings), at once."""
        params = seq.request.params
        n_out, total = len(seq.output_ids), len(seq.token_ids)
        kept, end = len(tokens), None
        for i, token in enumerate(tokens, 1):
            end = self.token_end(params, token, n_out + i, total + i)
            if end is not None:
                kept = i
                break
        seq.token_ids.extend(tokens[:kept])
        seq.depths.extend(depths[:kept])
        seq.cumulative_logprob += sum(logprobs[:kept])
        if with_top:
            seq.logprobs.extend({t: lp} for t, lp in zip(tokens[:kept], logprobs[:kept]))
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)
        if end is not None:
            finish(seq, *end)
        self._retire_if_finished(seq)
        return kept

    def _retire_if_finished(self, seq: Sequence) -> None:
        if seq.finished:
            self.retire(seq)

    def token_end(self, params: SamplingParams, token: int, n_out: int, total: int,
                  stop_strings: Callable[[], str | None] | None = None) -> tuple[str, int | str | None] | None:
        """(finish reason, stop reason) if `token`, making the output n_out and the sequence
        `total` tokens long, ends it: EOS, a stop token id, a stop string (found by
        `stop_strings`), all once min_tokens are out; then max_tokens or the context."""
        if n_out >= params.min_tokens:
            if token in self.eos_ids and not params.ignore_eos:
                return "stop", None
            if token in params.stop_token_ids:
                return "stop", token
            found = stop_strings() if stop_strings is not None else None
            if found is not None:
                return "stop", found
        if n_out >= params.max_tokens or total >= self.max_model_len:
            return "length", None
        return None

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        prev_len = len(seq.text)
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)

        def stop_string() -> str | None:
            for s in params.stop:
                at = seq.text.find(s, max(0, prev_len - len(s) + 1))
                if at >= 0:
                    seq.text = seq.text[: at + len(s) if params.include_stop_str_in_output else at]
                    return s
            return None

        end = self.token_end(params, token, len(seq.output_ids), len(seq.token_ids), stop_string)
        if end is not None:
            finish(seq, *end)

    @staticmethod
    def outputs(touched: set[Request]) -> list[RequestOutput]:
        """RequestOutputs of the touched requests that report now (finished, or cumulative)."""
        return [OutputProcessor.output(req) for req in touched
                if req.finished or req.params.output_kind == "cumulative"]

    @staticmethod
    def output(req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text
            if not seq.finished and text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")       # hold back an incomplete UTF-8 character
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_ids), depths=list(seq.depths),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if req.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=list(req.prompt_token_ids), outputs=outs,
                             prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             finished=req.finished, num_preemptions=req.num_preemptions)
