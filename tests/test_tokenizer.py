"""Tokenizer: byte-level and BPE round trips, files, chat templates, incremental detokenization."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from morserve.tokenizer import DetokenizeState, Tokenizer, bytes_to_unicode

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ALPHABET = "abc xyz 019 .,!?\n\té日本語ß€🙂Ωж"


def random_text(rng: random.Random, n: int = 60) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    return random.Random(seed)


def bpe_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained here, with ChatML specials."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld, 日本語のテキスト", "1234 5678 90"] * 20
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_tokens=["<|im_end|>", "<|endoftext|>"],
                     chat_template=CHATML)


# ---- byte level ---------------------------------------------------------------------------------
def test_byte_level_ids_are_bytes_and_round_trip(rng, tmp_path):
    tok = Tokenizer.byte_level(chat_template=CHATML)
    text = random_text(rng)
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (258, 256, [257])
    assert tok.encode(text, add_special_tokens=True) == list(text.encode("utf-8"))   # add_bos_token False
    assert tok.decode([256, *tok.encode("hi"), 257]) == "hi"
    assert tok.decode([256, *tok.encode("hi"), 257], skip_special_tokens=False) == "<s>hi</s>"
    assert tok.id_to_token(ord("A")) == "A" and tok.id_to_token(257) == "</s>"
    assert tok.id_to_token("é".encode()[0]) == "\ufffd"                # half a character
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.chat_template) == (256, [257], tok.chat_template)


def test_bytes_to_unicode_is_gpt2_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord("A")], table[ord(" ")], table[0]) == ("A", "Ġ", "Ā")


# ---- BPE ----------------------------------------------------------------------------------------
def test_bpe_round_trip_and_files(rng, tmp_path):
    tok = bpe_tokenizer()
    text = random_text(rng) + " the quick brown fox"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())                     # merges are used
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user")[0] == tok.bos_token_id   # special text -> special token
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(text) == ids and loaded.decode(ids) == text
    assert loaded.eos_token_ids == tok.eos_token_ids == [2, 0]
    assert loaded.vocab_size == tok.vocab_size


def test_load_hugging_face_tokenizer_config(tmp_path):
    tok = bpe_tokenizer()
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "x"}]}))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_token, loaded.eos_tokens, loaded.chat_template) == ("<|im_start|>", ["<|im_end|>"], CHATML)
    assert loaded.add_bos_token is False       # the backend's post-processor adds no BOS
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(tok.backend, bos_token="<nope>")


# ---- chat templates -----------------------------------------------------------------------------
def test_chat_template_renders_like_hugging_face():
    tok = bpe_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüß dich 🙂"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrüß dich 🙂<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected.removesuffix("<|im_start|>assistant\n")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools: ' + m['role']) }}"
                         "{% endif %}{% if loop.index > 1 %}{% break %}{% endif %}{{ bos_token }}{{ m | tojson }}"
                         "{% endfor %}{{ extra }}")
    assert tok.apply_chat_template(msgs, extra="!") == '<|im_start|>{"role": "system", "content": "Be brief."}!'
    with pytest.raises(ValueError, match="no tools: tool"):
        tok.apply_chat_template([{"role": "tool", "content": ""}])
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValueError, match="chat template error"):
        tok.apply_chat_template(msgs)                      # the sandbox blocks attribute escapes
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(msgs)
    byte_tok = Tokenizer.byte_level(chat_template="{{ messages[0]['content'] }}{{ eos_token }}")
    assert byte_tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


# ---- incremental detokenization -----------------------------------------------------------------
@pytest.mark.parametrize("make", [Tokenizer.byte_level, bpe_tokenizer])
def test_detokenize_streams_only_complete_text(make, rng):
    tok = make()
    text = random_text(rng, 80)
    ids = tok.encode(text)
    state = DetokenizeState(tok)
    pieces = []
    for i, token in enumerate(ids):
        piece = state.push(token)
        pieces.append(piece)
        assert "\ufffd" not in piece
        # released text is a prefix of the full decode; only a tail ending in a split character is held
        so_far = "".join(pieces)
        full = tok.decode(ids[: i + 1])
        assert full.startswith(so_far)
        assert full[len(so_far):] == "" or full.endswith("\ufffd")
    assert "".join(pieces) + state.flush() == text


def test_detokenize_holds_split_character_then_releases_it():
    tok = Tokenizer.byte_level()
    state = DetokenizeState(tok)
    assert state.push(tok.encode("a")) == "a"
    euro = tok.encode("€")                                   # three bytes
    assert [state.push(t) for t in euro] == ["", "", "€"]
    assert state.push([257]) == ""                           # </s> is skipped
    assert state.push(tok.encode("b")) == "b"
    raw = DetokenizeState(tok, skip_special_tokens=False)
    assert raw.push([256, ord("x")]) == "<s>x"


def test_detokenize_releases_invalid_bytes():
    tok = Tokenizer.byte_level()
    state = DetokenizeState(tok)
    assert state.push(0xE2) == ""                            # a lead byte that never completes
    assert state.flush() == "\ufffd"
    state = DetokenizeState(tok)
    out = "".join(state.push(0xFF) for _ in range(4))        # bytes that are never valid UTF-8
    assert out == "\ufffd" * 4 and state.flush() == ""
