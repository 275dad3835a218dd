"""Training data: read a text file or a directory of text files, get a tokenizer (load one or
train a small byte-level BPE on the corpus), encode everything into one token stream, split off a
held-out tail, and sample random fixed-length windows for language-model training
(`CorpusData`: the trainer's data source for a corpus)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from morserve.model.mor import MoRModel
from morserve.tokenizer import Tokenizer
from morserve.train.metrics import evaluate

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
BOS, EOS = "<s>", "</s>"


def read_texts(path: str | Path) -> list[str]:
    """The documents under `path`: the file itself, or every text file below a directory
    (suffixes TEXT_SUFFIXES, sorted by path)."""
    path = Path(path)
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    if not path.is_dir():
        raise FileNotFoundError(f"no training text at {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 alphabet, digits split one by one) with <s> = 0 and </s> = 1."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token=BOS, eos_tokens=[EOS])


def get_tokenizer(spec: str | Path | None, texts: list[str], vocab_size: int) -> Tokenizer:
    """Load the tokenizer at `spec` (a directory holding tokenizer.json, or the file itself),
    or train a BPE of `vocab_size` on `texts` when spec is None."""
    if spec is None:
        return train_bpe_tokenizer(texts, vocab_size)
    spec = Path(spec)
    return Tokenizer.load(spec.parent if spec.is_file() else spec)


def encode_corpus(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One int64 stream: the documents' tokens, each document followed by the first EOS token."""
    eos = tokenizer.eos_token_ids[:1]
    ids: list[int] = []
    for encoding in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
        ids += encoding.ids + eos
    return torch.tensor(ids, dtype=torch.long)


def split_holdout(ids: torch.Tensor, fraction: float, min_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the stream's tail, at least `min_tokens` long."""
    n_val = max(min_tokens, int(len(ids) * fraction))
    if n_val >= len(ids) // 2:
        raise ValueError(f"corpus too small: {len(ids)} tokens for a held-out part of {n_val}")
    return ids[:-n_val], ids[-n_val:]


def sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs [B, T] and next-token targets [B, T]."""
    if len(ids) <= seq_len + 1:
        raise ValueError(f"need more than {seq_len + 1} tokens, got {len(ids)}")
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(ids: torch.Tensor, batch_size: int, seq_len: int,
                  max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of `ids` (deterministic evaluation)."""
    n = min((len(ids) - 1) // seq_len, batch_size * max_batches)
    if n == 0:
        raise ValueError(f"need more than {seq_len} held-out tokens, got {len(ids)}")
    windows = ids[:n * seq_len + 1]
    x = windows[:-1].view(n, seq_len)
    y = windows[1:].reshape(n, seq_len)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


class CorpusData:
    """Training windows from a token stream and a fixed held-out evaluation set (`evaluate`:
    held-out loss and routing statistics, `morserve.train.metrics.evaluate`)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, val_fraction: float = 0.01, eval_batch_size: int = 16,
                 eval_batches: int = 8) -> None:
        self.seq_len = seq_len
        self.train_ids, self.val_ids = split_holdout(ids, val_fraction, min_tokens=2 * seq_len + 2)
        self.eval_set = fixed_batches(self.val_ids, eval_batch_size, seq_len, eval_batches)

    def describe(self) -> str:
        return f"{len(self.train_ids)} train / {len(self.val_ids)} held-out tokens"

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_batch(self.train_ids, batch_size, self.seq_len, generator)

    def evaluate(self, model: MoRModel, autocast: AbstractContextManager | None = None) -> dict:
        return evaluate(model, self.eval_set, autocast)
