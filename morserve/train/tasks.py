"""Synthetic tasks whose difficulty per position is known: copy, counting, pattern.

Every task is next-token prediction over one small fixed vocabulary (`task_tokenizer`: no BPE
to train, a word-level tokenizer saved with the model, so a task model is served like any other
and its answers are plain tokens: no classifier head is needed). A sample is a fixed-length
token sequence; each *target* position (the token predicted from the position before it) has a
kind with a known difficulty:

- copy `<s> s1..sk | s1..sk </s>`: `source` symbols are random (unpredictable, left out of the
  loss), the `delimiter` and `end` come at fixed positions (easy), each `copy` symbol must be
  fetched from k + 1 positions back (hard);
- counting `<s> x x * 1 ; x * 2 ; x x ...`: random `symbol`s (unpredictable) and stars; after the
  n-th star comes `count` n mod 10 (hard: find the previous count, add one), then a `separator`
  `;` (easy: always follows a digit);
- pattern `<s> m1..mp m1..mp ... </s>`: a motif of p in {2, 3, 4} distinct symbols repeated;
  the first period is random (`motif`), the first `return` to m1 is a guess (p is unknown yet),
  every later `repeat` follows from the symbol p back (hard: an induction look-up), and the
  `end` token comes at a fixed position (easy).

The trivial baseline of a kind is the best context-free guess: the accuracy of always
predicting that kind's most frequent target (measured on the evaluation set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from morserve.tokenizer import Tokenizer

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SYMBOLS = tuple("abcdefghijklmnop")
DIGITS = tuple("0123456789")
MARKS = ("|", "*", ";")
VOCAB = (BOS, EOS, UNK, *SYMBOLS, *DIGITS, *MARKS)
IGNORE = -100          # target id left out of the loss (F.cross_entropy's ignore_index)


def task_tokenizer() -> Tokenizer:
    """The word-level tokenizer of every task: tokens are space-separated words of VOCAB."""
    backend = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([BOS, EOS, UNK])
    return Tokenizer(backend, bos_token=BOS, eos_tokens=[EOS])


ID = {t: i for i, t in enumerate(VOCAB)}


@dataclass(frozen=True)
class Kind:
    """A class of target positions: its name, whether the context determines it, and why."""

    name: str
    predictable: bool
    description: str


@dataclass
class TaskBatch:
    """inputs [N, T]; next_tokens [N, T] (the true next token at every position); kinds [N, T]
    (index into the task's kinds, of the target predicted from that position)."""

    inputs: torch.Tensor
    next_tokens: torch.Tensor
    kinds: torch.Tensor

    def loss_targets(self, kinds: tuple[Kind, ...]) -> torch.Tensor:
        """next_tokens with unpredictable kinds replaced by IGNORE."""
        predictable = torch.tensor([k.predictable for k in kinds])[self.kinds]
        return self.next_tokens.masked_fill(~predictable, IGNORE)


Sample = tuple[list[int], list[int]]          # (tokens incl. <s>, kind index of tokens[1:])


@dataclass(frozen=True)
class Task:
    """A generator of fixed-length samples, and the kinds of their target positions."""

    name: str
    kinds: tuple[Kind, ...]
    seq_len: int                               # input length T (= sample length - 1)
    make: Callable[[torch.Generator], Sample]

    def batch(self, n: int, generator: torch.Generator) -> TaskBatch:
        samples = [self.make(generator) for _ in range(n)]
        tokens = torch.tensor([s[0] for s in samples])
        kinds = torch.tensor([s[1] for s in samples])
        return TaskBatch(tokens[:, :-1], tokens[:, 1:], kinds)

    def kind_index(self, name: str) -> int:
        return [k.name for k in self.kinds].index(name)


def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def copy_task(copy_length: int = 6, num_symbols: int = 16) -> Task:
    kinds = (Kind("source", False, "random symbol to be copied later"),
             Kind("delimiter", True, "`|` after the k source symbols (fixed position)"),
             Kind("copy", True, "the symbol k + 1 positions back (retrieval)"),
             Kind("end", True, "`</s>` after the copy (fixed position)"))

    def make(gen: torch.Generator) -> Sample:
        src = [ID[SYMBOLS[_randint(num_symbols, gen)]] for _ in range(copy_length)]
        tokens = [ID[BOS], *src, ID["|"], *src, ID[EOS]]
        return tokens, [0] * copy_length + [1] + [2] * copy_length + [3]
    _check_symbols(num_symbols)
    return Task("copy", kinds, 2 * copy_length + 2, make)


def counting_task(length: int = 24, star_prob: float = 0.3, num_symbols: int = 8) -> Task:
    kinds = (Kind("symbol", False, "random symbol or star"),
             Kind("count", True, "number of stars so far, mod 10 (previous count + 1)"),
             Kind("separator", True, "`;` after a count digit"),
             Kind("end", True, "`</s>` (fixed position)"))

    def make(gen: torch.Generator) -> Sample:
        tokens, kinds_, stars = [ID[BOS]], [], 0
        while len(kinds_) < length:
            if len(kinds_) + 3 <= length and float(torch.rand((), generator=gen)) < star_prob:
                stars += 1
                tokens += [ID["*"], ID[DIGITS[stars % 10]], ID[";"]]
                kinds_ += [0, 1, 2]
            else:
                tokens.append(ID[SYMBOLS[_randint(num_symbols, gen)]])
                kinds_.append(0)
        return tokens + [ID[EOS]], kinds_ + [3]
    _check_symbols(num_symbols)
    return Task("counting", kinds, length + 1, make)


def pattern_task(length: int = 20, periods: tuple[int, ...] = (2, 3, 4), num_symbols: int = 16) -> Task:
    kinds = (Kind("motif", False, "a symbol of the first period (random)"),
             Kind("return", True, "first return to the motif's start (the period is not known yet)"),
             Kind("repeat", True, "the symbol one period back (induction look-up)"),
             Kind("end", True, "`</s>` (fixed position)"))

    def make(gen: torch.Generator) -> Sample:
        p = periods[_randint(len(periods), gen)]
        motif = torch.randperm(num_symbols, generator=gen)[:p].tolist()
        body = [ID[SYMBOLS[motif[i % p]]] for i in range(length)]
        kinds_ = [0 if i < p else 1 if i == p else 2 for i in range(length)]
        return [ID[BOS], *body, ID[EOS]], kinds_ + [3]
    _check_symbols(num_symbols)
    if max(periods) >= length:
        raise ValueError(f"pattern length {length} must exceed the longest period {max(periods)}")
    return Task("pattern", kinds, length + 1, make)


def _check_symbols(n: int) -> None:
    if not 1 <= n <= len(SYMBOLS):
        raise ValueError(f"num_symbols must be in 1..{len(SYMBOLS)}, got {n}")


TASKS: dict[str, Callable[..., Task]] = {"copy": copy_task, "counting": counting_task, "pattern": pattern_task}


def get_task(name: str, **options) -> Task:
    """The task called `name` (copy, counting, pattern) with its generator options."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**options)
