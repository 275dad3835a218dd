"""Structured outputs: a constraint (JSON schema, any JSON, regex, choice or EBNF grammar) compiled by
xgrammar against the model's vocabulary, and per sequence a matcher that gives the sampler the
packed bitmask of tokens allowed next (bit j of word i = token 32 i + j) and advances on every token
the sequence accepts.

The matcher's state is a function of the sequence's output tokens alone: `GrammarState.next_mask`
re-derives it from them whenever the count differs (a recomputed or otherwise rebuilt sequence), so
it survives preemption and never depends on other requests. The grammar's end is the model's EOS:
once the constraint is complete, only EOS (or tokens that continue it) stay allowed; a sequence
whose matcher has terminated is finished.

xgrammar is imported on first use (it is an optional extra, `morserve[structured]`, and slow to
import); compiled grammars are cached by the compiler.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar

    from morserve.tokenizer import Tokenizer


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one of json (a JSON schema, as text or object),
    json_object (any JSON object), regex, choice (one of these strings) or grammar (EBNF).
    disable_any_whitespace: JSON without free whitespace between tokens (compact separators);
    otherwise whitespace is free but each run is at most MAX_WHITESPACE characters, so a small
    model cannot loop on whitespace until max_tokens."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    KINDS = ("json", "regex", "choice", "grammar", "json_object")
    MAX_WHITESPACE = 16

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(self.KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of strings, got {list(self.choice)!r}")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar matching exactly one of the strings (JSON string literals are valid EBNF
    string literals in xgrammar)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarState:
    """One sequence's matcher. `next_mask` (after syncing to the output tokens) -> [W] int32 packed
    bitmask; `accept(token)` -> False if the grammar rejects it; `terminated` once EOS was taken."""

    def __init__(self, compiled: "xgrammar.CompiledGrammar", vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._accepted = 0

    def next_mask(self, output_ids: list[int]) -> torch.Tensor:
        """The tokens allowed after `output_ids`; none at all if the grammar rejects them (the
        sampler then fails this sequence alone)."""
        if self._accepted != len(output_ids):
            self._matcher.reset()
            self._accepted = 0
            if not all(self.accept(token) for token in output_ids):
                self._accepted = -1                 # out of sync until the next re-derivation
                return torch.zeros_like(self._bitmask[0])
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return self._bitmask[0]

    def accept(self, token: int) -> bool:
        ok = self._matcher.accept_token(token)
        self._accepted += ok
        return ok

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


class StructuredBackend:
    """The grammar compiler for one model: tokenizer vocabulary, the logits' width, the stop ids."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler: "xgrammar.GrammarCompiler | None" = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> "xgrammar.GrammarCompiler":
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                    from transformers import PreTrainedTokenizerFast
                except ImportError as exc:
                    raise ValueError(f"structured outputs need xgrammar: pip install 'morserve[structured]' "
                                     f"({exc})") from None

                hf = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> "xgrammar.CompiledGrammar":
        """The compiled constraint; ValueError naming the kind and xgrammar's message if invalid."""
        compiler = self._get_compiler()
        kind = spec.kind
        whitespace = ({"any_whitespace": False} if spec.disable_any_whitespace else
                      {"any_whitespace": True, "max_whitespace_cnt": spec.MAX_WHITESPACE})
        try:
            if kind in ("json", "json_object"):
                schema = spec.json if kind == "json" else {"type": "object"}
                schema = schema if isinstance(schema, str) else json.dumps(schema)
                return compiler.compile_json_schema(schema, **whitespace)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except Exception as exc:     # xgrammar raises RuntimeError / ValueError / its own types
            raise ValueError(f"invalid {kind} for structured outputs: {_first_line(exc)}") from None

    def state(self, compiled: "xgrammar.CompiledGrammar") -> GrammarState:
        return GrammarState(compiled, self.vocab_size)


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its log prefix ("[time] file.cc:line: Check failed: ...: ")."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return _LOG_PREFIX.sub("", text)[:500]

