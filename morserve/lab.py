"""`morserve.lab`: the Python API for MoR experiments (the CLI's `train`, `analyze` and
`generate`-with-depths are thin layers over it).

    from morserve import lab
    m = lab.build(router="expert", num_recursions=3, hidden_size=64, task="copy")
    metrics = lab.train(m, task="copy", steps=300)        # {"accuracy": ..., "by_kind": ...}
    print(lab.task_report(m, "copy"))                      # accuracy and depth per kind
    g = lab.generate(m, "<s> a b c d e f |", max_tokens=7)
    print(g.annotated())                                   # each token with its depth
    lab.save(m, "runs/copy")                               # then: morserve serve --model runs/copy

A `LabModel` is a MoRModel with its tokenizer (the fixed task vocabulary, a BPE trained on a
corpus, or a loaded one). Generation here runs the dense reference forward (the engine's oracle)
on the model in memory; the serving engine gives the same depths for a saved model.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from morserve.checkpoint import load_pretrained, save_checkpoint
from morserve.checkpoint.own import is_own_checkpoint, load_checkpoint
from morserve.config import ModelConfig, MoRConfig
from morserve.model.mor import MoRModel
from morserve.model.reference import reference_forward
from morserve.tokenizer import Tokenizer
from morserve.train.analyze import ModelSummary, summarize
from morserve.train.compare import format_comparison, plot_comparison
from morserve.train.data import CorpusData, encode_corpus, read_texts, train_bpe_tokenizer
from morserve.train.task_eval import TaskData, TaskReport, evaluate_task
from morserve.train.tasks import ID, VOCAB, Task, get_task, task_tokenizer
from morserve.train.trainer import TrainResult, TrainSettings, fit

__all__ = ["LabModel", "Generation", "Server", "Tokenizer", "read_texts", "build", "from_config", "train", "task_report", "analyze", "compare", "generate",
           "save", "load", "serve"]


@dataclass
class LabModel:
    """A model, its tokenizer, a display name, and the results of every `train` call so far."""

    model: MoRModel
    tokenizer: Tokenizer
    name: str = "model"
    runs: list[TrainResult] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


@dataclass
class Generation:
    """Generated token ids and text; depths[i] is the depth of the position that produced
    token i (the last prompt token for the first one)."""

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    depths: list[int]
    text: str

    def annotated(self) -> str:
        """Each generated token followed by its depth, e.g. `a[3] b[1]`."""
        return " ".join(f"{t}[{d}]" for t, d in zip(self.tokens, self.depths))


def _as_task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


def build(router: str | None = "expert", num_recursions: int = 3, hidden_size: int = 64, *,
          block_layers: int = 1, num_layers: int | None = None, heads: int | None = None,
          kv_heads: int | None = None, intermediate_size: int | None = None, sharing: str = "middle_cycle",
          kv_mode: str = "recursion", capacity: float | list[float] | None = None, alpha: float = 0.1,
          router_type: str = "linear", max_len: int = 256, task: str | Task | None = None,
          corpus: str | Path | list[str] | None = None, tokenizer: Tokenizer | str | Path | None = None,
          vocab_size: int = 4096, seed: int = 0, init_std: float = 0.02, name: str | None = None) -> LabModel:
    """A freshly initialised model. Layers: `num_layers`, or 1 + block_layers * Nr + 1 (middle
    sharings) / block_layers * Nr (cycle, sequence). Tokenizer: `tokenizer` (a Tokenizer or a
    directory holding tokenizer.json), else a byte-level BPE of `vocab_size` trained on `corpus`,
    else the fixed task vocabulary. `router` is expert, token or None (every token takes every
    recursion); `capacity` a keep ratio or one fraction per recursion (expert choice)."""
    tokenizer = _resolve_tokenizer(tokenizer, corpus, vocab_size)
    fixed = 2 if sharing.startswith("middle_") else 0
    layers = num_layers if num_layers is not None else fixed + block_layers * num_recursions
    heads = heads or max(1, hidden_size // 32)
    if task is not None:
        max_len = max(max_len, _as_task(task).seq_len)
    mor = MoRConfig(num_recursions=num_recursions, sharing=sharing, router=router,
                    router_func="softmax" if router == "token" else "sigmoid", router_type=router_type,
                    alpha=alpha, kv_mode=kv_mode, capacity=capacity)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64),
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=max_len,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_ids or None,
                         mor=mor).validate()
    model = MoRModel(config).init_weights(seed, init_std)
    return LabModel(model, tokenizer, name or _default_name(config))


def from_config(config: dict | ModelConfig, *, tokenizer: Tokenizer | str | Path | None = None,
                corpus: str | Path | list[str] | None = None, vocab_size: int = 4096, task: str | Task | None = None,
                seed: int = 0, init_std: float = 0.02, name: str | None = None) -> LabModel:
    """A freshly initialised model from a config (our config.json format); its vocabulary and
    special tokens are taken from the tokenizer (resolved as in `build`)."""
    tokenizer = _resolve_tokenizer(tokenizer, corpus, vocab_size)
    data = dict(config.to_dict() if isinstance(config, ModelConfig) else config)
    data["vocab_size"] = max(data.get("vocab_size", 0), tokenizer.vocab_size)
    data["bos_token_id"] = tokenizer.bos_token_id
    data["eos_token_id"] = tokenizer.eos_token_ids or None
    if task is not None:
        data["max_position_embeddings"] = max(data.get("max_position_embeddings", 0), _as_task(task).seq_len)
    cfg = ModelConfig.from_dict(data)
    return LabModel(MoRModel(cfg).init_weights(seed, init_std), tokenizer, name or _default_name(cfg))


def _resolve_tokenizer(tokenizer: Tokenizer | str | Path | None, corpus: str | Path | list[str] | None,
                       vocab_size: int) -> Tokenizer:
    if isinstance(tokenizer, (str, Path)):
        return Tokenizer.load(tokenizer)
    if tokenizer is not None:
        return tokenizer
    return train_bpe_tokenizer(_texts(corpus), vocab_size) if corpus is not None else task_tokenizer()


def _check_task_vocabulary(tokenizer: Tokenizer) -> None:
    wrong = [t for t in VOCAB if tokenizer.backend.token_to_id(t) != ID[t]]
    if wrong:
        raise ValueError(f"task training needs the task vocabulary (build(task=...) or a model trained on a task); "
                         f"this tokenizer maps {wrong[:5]} differently")


def _default_name(config: ModelConfig) -> str:
    router = config.mor.router or "fixed"
    return f"{router}-Nr{config.mor.num_recursions}-{config.mor.sharing}-d{config.hidden_size}"


def _texts(corpus: str | Path | list[str]) -> list[str]:
    return list(corpus) if isinstance(corpus, list) else read_texts(corpus)


def train(lm: LabModel, task: str | Task | None = None, corpus: str | Path | list[str] | None = None, *,
          steps: int = 300, seq_len: int = 128, val_fraction: float = 0.01, eval_batches: int = 8,
          eval_size: int = 512, out: str | Path | None = None, **settings) -> dict:
    """Train on a synthetic task or on a corpus (file, directory, or list of texts) and return the
    final metrics: train_loss, seconds, steps and the held-out evaluation (for a task: accuracy,
    baseline, mean depth and per-kind accuracy / depth). `settings` are `TrainSettings` fields
    (batch_size, lr, target_depth, threads, ...); `out` also writes a checkpoint and the log."""
    if (task is None) == (corpus is None):
        raise ValueError("train needs exactly one of task= or corpus=")
    known = {f.name for f in fields(TrainSettings)}
    unknown = set(settings) - known
    if unknown:
        raise TypeError(f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}")
    run = TrainSettings(steps=steps, **{"progress": False, **settings})
    if lm.tokenizer.vocab_size > lm.config.vocab_size:
        raise ValueError(f"the tokenizer has {lm.tokenizer.vocab_size} tokens, the model only {lm.config.vocab_size}")
    if task is not None:
        _check_task_vocabulary(lm.tokenizer)
        data = TaskData(_as_task(task), eval_size=eval_size)
    else:
        ids = encode_corpus(lm.tokenizer, _texts(corpus))
        data = CorpusData(ids, seq_len, val_fraction, run.batch_size, eval_batches)
    result = fit(lm.model, data, run, out, lm.tokenizer)
    lm.runs.append(result)
    return {"train_loss": result.train_loss, "seconds": result.seconds, "steps": result.steps, **result.eval}


def task_report(lm: LabModel, task: str | Task, samples: int = 512, seed: int = 1234,
                routing: str = "threshold") -> TaskReport:
    """Accuracy and depth per kind of position on fresh samples of `task` (print it for a table)."""
    task = _as_task(task)
    batch = task.batch(samples, torch.Generator().manual_seed(seed))
    return evaluate_task(lm.model, task, batch, routing)


def analyze(lm: LabModel, task: str | Task | None = None, text: str | None = None, samples: int = 512,
            seq_len: int = 256) -> ModelSummary:
    """The comparable numbers of one model: loss, accuracy (task), mean depth, depth histogram and
    routing entropy (raw, its maximum, and normalised to [0, 1]) on a task or on a text."""
    return summarize(lm.model, lm.tokenizer, lm.name, task=_as_task(task) if task is not None else None,
                     text=text, samples=samples, seq_len=seq_len)


def compare(models: list[LabModel], task: str | Task | None = None, text: str | None = None,
            png: str | Path | None = None, samples: int = 512) -> list[ModelSummary]:
    """`analyze` for each model; with `png`, also the side-by-side figure."""
    rows = [analyze(m, task, text, samples) for m in models]
    if png is not None:
        plot_comparison(rows, png)
    print(format_comparison(rows))
    return rows


@torch.no_grad()
def generate(lm: LabModel, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
             seed: int | None = None, stop_at_eos: bool = True) -> Generation:
    """Sample `max_tokens` tokens after `prompt` (greedy at temperature 0) with the threshold
    routing rule, recording the depth of the position that produced each token."""
    ids = lm.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt has no tokens")
    limit = lm.config.max_position_embeddings
    if len(ids) + max_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                         f"{limit} positions")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    device = next(lm.model.parameters()).device
    was_training = lm.model.training
    lm.model.eval()
    new, depths = [], []
    for _ in range(max_tokens):
        out = reference_forward(lm.model, torch.tensor(ids + new, device=device))
        logits = out.logits[-1].float()
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=gen))
        else:
            token = int(logits.argmax())
        new.append(token)
        depths.append(int(out.depths[-1]))
        if stop_at_eos and token in lm.tokenizer.eos_token_ids:
            break
    lm.model.train(was_training)
    pieces = [lm.tokenizer.id_to_token(t) for t in new]
    return Generation(prompt, new, pieces, depths, lm.tokenizer.decode(new))


def save(lm: LabModel, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the model as a morserve checkpoint (servable with `morserve serve --model PATH`)."""
    return save_checkpoint(lm.model, lm.tokenizer, path, dtype=dtype)


def load(name_or_path: str | Path) -> LabModel:
    """A checkpoint (our format: kept shared, trainable) or any model `load_pretrained` knows."""
    path = Path(name_or_path)
    if is_own_checkpoint(path):
        model, tokenizer = load_checkpoint(path, as_served=False)
        name = path.name
    else:
        pre = load_pretrained(name_or_path)
        model, tokenizer, name = pre.model, pre.tokenizer, pre.name
    if tokenizer is None:
        raise ValueError(f"{name_or_path} has no tokenizer")
    return LabModel(model, tokenizer, name)


class Server:
    """`morserve serve --model MODEL` in a subprocess on a free loopback port; a context manager
    that waits until /health answers and stops the server on exit. `url` is the OpenAI base URL."""

    def __init__(self, model: str | Path, port: int | None = None, threads: int = 1, startup_timeout: float = 120.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.model = str(model)
        self.port = port or _free_port()
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def start(self) -> "Server":
        cmd = [sys.executable, "-m", "morserve.cli", "serve", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", str(self.threads), "--log-level", "warning", *self.extra_args]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"morserve serve exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"morserve serve did not become healthy within {self.startup_timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(model: LabModel | str | Path, path: str | Path | None = None, **options) -> Server:
    """A started `Server` for a saved model (name or path), or for a LabModel saved to `path` first."""
    if isinstance(model, LabModel):
        if path is None:
            raise ValueError("serving a LabModel needs path= to save it to")
        model = save(model, path)
    return Server(model, **options).start()
