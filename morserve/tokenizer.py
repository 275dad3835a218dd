"""Tokenizer: a `tokenizers.Tokenizer` (tokenizer.json) plus special tokens and the chat template,
and incremental detokenization for streaming.

`Tokenizer.byte_level()` builds the tiny models' tokenizer (ids 0..255 = byte values, then <s> and
</s>) with the same library, so it round-trips through tokenizer.json like any BPE tokenizer.
Chat templates render the way Hugging Face transformers renders them: sandboxed Jinja with
`trim_blocks`/`lstrip_blocks`, loop controls, `raise_exception`, `tojson` and `strftime_now`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# A UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens: a tail still incomplete
# after this many tokens is invalid UTF-8 and is released as U+FFFD instead of held forever.
MAX_HELD_TOKENS = 4


class Tokenizer:
    """Text <-> token ids for one model; special tokens are referred to by their text."""

    def __init__(self, backend: HFTokenizer, bos_token: str | None = None,
                 eos_tokens: list[str] | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_tokens = list(eos_tokens or [])
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self._compiled: tuple[str, Template] | None = None
        for tok in [bos_token, *self.eos_tokens]:
            if tok is not None and backend.token_to_id(tok) is None:
                raise ValueError(f"special token {tok!r} is not in the vocabulary")

    # ---- ids and text --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.eos_tokens]

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for: its longest vocabulary entry
        (byte-level and metaspace entries have one character per byte or character of text)."""
        return max(len(token) for token in self.backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (special-token text in it becomes the special token, as in HF);
        with add_special_tokens, BOS first when the model wants one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The text one token stands for, special tokens included (for logprobs display); a
        token holding part of a multi-byte character shows as U+FFFD."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render `messages` with the model's chat template. Extra keyword arguments (e.g. `tools`)
        reach the template as variables. Template errors, including `raise_exception(...)` calls,
        raise ValueError with the template's message."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        specials = {"bos_token": self.bos_token or "", "eos_token": (self.eos_tokens or [""])[0]}
        try:
            return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **{"tools": None, "documents": None, **specials, **template_kwargs})
        except TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc

    def _template(self) -> Template:
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, _chat_environment().from_string(self.chat_template))
        return self._compiled[1]

    # ---- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template) into
        `directory`, in the field names Hugging Face uses."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        config = {"bos_token": self.bos_token,
                  "eos_token": self.eos_tokens[0] if self.eos_tokens else None,
                  "eos_tokens": self.eos_tokens, "add_bos_token": self.add_bos_token,
                  "chat_template": self.chat_template}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json if present: ours or Hugging Face's)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        backend = HFTokenizer.from_file(str(path))
        config_path = directory / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        bos = _token_text(config.get("bos_token"))
        eos = config.get("eos_tokens")
        if eos is None:
            eos = [config["eos_token"]] if config.get("eos_token") else []
        add_bos = config.get("add_bos_token")
        if add_bos is None:          # HF fast tokenizers add BOS in their post-processor
            add_bos = bos is not None and backend.encode("a").ids[:1] == [backend.token_to_id(bos)]
        return cls(backend, bos_token=bos, eos_tokens=[_token_text(t) for t in eos],
                   chat_template=_template_text(config.get("chat_template")), add_bos_token=bool(add_bos))

    @classmethod
    def byte_level(cls, chat_template: str | None = None) -> "Tokenizer":
        """256 byte tokens (id = byte value; GPT-2 byte-to-unicode alphabet in tokenizer.json),
        then the specials <s> (256) and </s> (257)."""
        byte_chars = bytes_to_unicode()
        backend = HFTokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<s>", "</s>"])
        return cls(backend, bos_token="<s>", eos_tokens=["</s>"], chat_template=chat_template)


@dataclass
class DetokenizeState:
    """Incremental detokenization for streaming: `push` token ids as they are generated and get
    back only the new text that is complete (a character split across tokens is held back until
    its last byte arrives); `flush` returns whatever is still held when the sequence ends.

    Text is decoded over a short window (the tokens since the previous emission plus the ones
    before it) so that decoders that depend on context (spaces, byte merging) behave as when
    decoding the whole sequence."""

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0          # start of the decode window
    read_offset: int = 0            # tokens before this have been emitted

    def push(self, token_ids: int | Iterable[int]) -> str:
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.ids))
        held = len(self.ids) - self.read_offset
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and held < MAX_HELD_TOKENS):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.ids))
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    moved = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return dict(sorted(chars.items()))


def _chat_environment() -> ImmutableSandboxedEnvironment:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(token: str | dict | None) -> str | None:
    """Hugging Face configs write special tokens as text or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _template_text(template: str | list | None) -> str | None:
    """Hugging Face configs may hold several named templates; the `default` one is the chat template."""
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template
