"""Tokenizer: a `tokenizers.Tokenizer` (tokenizer.json) plus special tokens and the chat template.

`Tokenizer.byte_level()` builds the tiny models' tokenizer (256 byte tokens + specials) with the
same library, so it round-trips through tokenizer.json like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    def __init__(self, backend: HFTokenizer, bos_token: str | None = None,
                 eos_tokens: list[str] | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_tokens = list(eos_tokens or [])
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS first where the model wants one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The text one token stands for (for logprobs display)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's Jinja chat template (sandboxed, as in transformers)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use completions with a plain prompt")

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=(self.eos_tokens or [""])[0])
        except TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc

    # ---- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_tokens": self.eos_tokens,
                  "chat_template": self.chat_template, "add_bos_token": self.add_bos_token}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        eos = config.get("eos_tokens")
        if eos is None and config.get("eos_token"):       # Hugging Face tokenizer_config.json
            eos = [config["eos_token"]]
        as_text = lambda t: t.get("content") if isinstance(t, dict) else t   # noqa: E731
        return cls(backend, bos_token=as_text(config.get("bos_token")),
                   eos_tokens=[as_text(t) for t in eos or []],
                   chat_template=config.get("chat_template"), add_bos_token=config.get("add_bos_token", False))

    @classmethod
    def byte_level(cls, chat_template: str | None = None) -> "Tokenizer":
        """256 byte tokens (ids 0..255 = byte values, GPT-2 byte-to-unicode alphabet) + <s> (256)
        and </s> (257)."""
        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[b]: b for b in range(256)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<s>", "</s>"])
        return cls(backend, bos_token="<s>", eos_tokens=["</s>"], chat_template=chat_template)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))

