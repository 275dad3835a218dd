"""Structured outputs and tool calling.

Unit level: the sampler's bitmask against xgrammar's own `apply_token_bitmask_inplace`; the
vocabulary handed to xgrammar against the tokenizer's own decoding (the first tokens a choice
grammar allows are exactly the tokens whose text starts one of the choices); the matcher re-derived
from output tokens; the Hermes / array tool-call parsers fed in random pieces against one whole feed.
Engine level: a grammar request next to a plain greedy one leaves the plain one's tokens unchanged
(per-tick and with the multi-step decode loop enabled), and grammar outputs survive preemption.
Server level, through the official openai client against real uvicorn servers: the default model
(models/morserve-mini-mor3, tiny: only the grammar makes its output valid) on /v1/completions, and
SmolLM2 on both endpoints with tools; every output is parsed and validated with jsonschema.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
import xgrammar as xgr
from test_server import ThreadedServer, wait_idle, write_checkpoint

from morserve.api.protocol import ChatTool
from morserve.api.server import create_app
from morserve.api.state import ServerSettings
from morserve.api.tools import ToolCallParser, ToolMode, tool_constraint
from morserve.engine import AsyncLLMEngine, EngineArgs, LLMEngine, SamplingParams
from morserve.engine.sampler import SamplingRow, _mask_disallowed
from morserve.engine.structured import StructuredBackend, StructuredOutputsParams
from morserve.tokenizer import Tokenizer

MINI = "models/morserve-mini-mor3"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random()


def person_schema(rng: random.Random) -> dict:
    """A fresh object schema: random key names, enum values and integer bounds."""
    keys = rng.sample(["name", "city", "age", "tags", "ok", "level", "code"], 4)
    lo = rng.randrange(0, 50)
    kinds = [{"type": "string", "maxLength": rng.randrange(3, 12)},
             {"type": "integer", "minimum": lo, "maximum": lo + rng.randrange(1, 500)},
             {"type": "array", "items": {"enum": rng.sample(["a", "b", "c", "d"], 3)}, "maxItems": 3},
             {"type": "boolean"}]
    rng.shuffle(kinds)
    return {"type": "object", "properties": dict(zip(keys, kinds)), "required": keys[:3],
            "additionalProperties": False}


# ---- masks against xgrammar ---------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [4096, 4101])
def test_sampler_mask_matches_xgrammar_apply_token_bitmask(vocab):
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    rows = 5
    logits = torch.randn(rows, vocab, generator=gen)
    words = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), generator=gen, dtype=torch.int64)
    words = words.to(torch.int32)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, words)
    with_mask = [0, 2, 3]
    params = SamplingParams(max_tokens=1)
    sampling = [SamplingRow(params, [], [], [], 0, 0, words[i] if i in with_mask else None) for i in range(rows)]
    got = logits.clone()
    _mask_disallowed(got, sampling)
    for i in range(rows):
        assert torch.equal(got[i], expected[i] if i in with_mask else logits[i])


@pytest.fixture(scope="module")
def mini_tokenizer() -> Tokenizer:
    return Tokenizer.load(MINI)


def _allowed(mask: torch.Tensor, vocab: int) -> set[int]:
    bits = (mask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.reshape(-1)[:vocab].nonzero().flatten().tolist())


def check_vocabulary_mapping(tokenizer: Tokenizer, vocab: int, rng: random.Random) -> None:
    words = ["hello", "world", "json", "42", "x", "value", "temperature"]
    choices = tuple(" ".join(rng.sample(words, 2)) for _ in range(3))
    backend = StructuredBackend(tokenizer, vocab, tokenizer.eos_token_ids)
    state = backend.state(backend.compile(StructuredOutputsParams(choice=choices)))
    texts = {t: tokenizer.decode([t], skip_special_tokens=False) for t in range(tokenizer.vocab_size)}
    expected = {t for t, text in texts.items() if text and any(c.startswith(text) for c in choices)
                and t not in tokenizer.eos_token_ids}
    assert _allowed(state.next_mask([]), vocab) == expected
    # after the whole of one choice: only EOS (the choices here are not prefixes of each other)
    ids = tokenizer.encode(choices[0])
    if not any(c != choices[0] and c.startswith(choices[0]) for c in choices):
        assert _allowed(state.next_mask(ids), vocab) == set(tokenizer.eos_token_ids)


def test_vocabulary_mapping_mini(mini_tokenizer, rng):
    check_vocabulary_mapping(mini_tokenizer, 4096, rng)


def test_matcher_rederives_from_output_tokens(mini_tokenizer, rng):
    backend = StructuredBackend(mini_tokenizer, 4096, mini_tokenizer.eos_token_ids)
    compiled = backend.compile(StructuredOutputsParams(json=person_schema(rng), disable_any_whitespace=True))
    walker, output = backend.state(compiled), []
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(12):
        allowed = sorted(_allowed(walker.next_mask(output), 4096) - set(mini_tokenizer.eos_token_ids))
        if not allowed:
            break
        token = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
        assert walker.accept(token)
        output.append(token)
        fresh = backend.state(compiled)               # a recomputed sequence: nothing accepted yet
        assert torch.equal(fresh.next_mask(output), walker.next_mask(output))
    assert not _allowed(backend.state(compiled).next_mask(mini_tokenizer.encode("not json")), 4096)


def test_invalid_constraints_name_the_kind(mini_tokenizer):
    backend = StructuredBackend(mini_tokenizer, 4096, mini_tokenizer.eos_token_ids)
    for spec, needle in [(StructuredOutputsParams(regex="a(b"), "invalid regex"),
                         (StructuredOutputsParams(json={"type": "nope"}), "invalid json"),
                         (StructuredOutputsParams(grammar="root ::= undefined_rule"), "invalid grammar")]:
        with pytest.raises(ValueError, match=needle):
            backend.compile(spec)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


# ---- tool-call parsers ---------------------------------------------------------------------------
TOOLS = [ChatTool.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}),
    ChatTool.model_validate({"type": "function", "function": {"name": "ping"}})]


def _feed_in_pieces(parser: ToolCallParser, text: str, rng: random.Random) -> tuple[str, list]:
    cuts = sorted(rng.sample(range(1, len(text)), min(8, len(text) - 1)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    content, deltas = "", []
    for k, piece in enumerate(pieces):
        c, d = parser.feed(piece, final=k == len(pieces) - 1)
        content, deltas = content + c, deltas + d
    return content, deltas


def test_hermes_parser_streamed_equals_whole(rng):
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>{"name": "ping", "arguments": {}}</tool_call> <tool_call>not json</tool_call>'
            ' done <tool_')
    mode = ToolMode("auto", tuple(TOOLS))
    whole = ToolCallParser(mode)
    content, deltas = whole.feed(text, final=True)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("ping", {})]
    assert content == "Let me check. \n <tool_call>not json</tool_call> done <tool_"
    streamed = ToolCallParser(mode)
    s_content, s_deltas = _feed_in_pieces(streamed, text, rng)
    assert s_content == content
    assert [(d.index, d.function.name, d.function.arguments) for d in s_deltas] == \
        [(d.index, d.function.name, d.function.arguments) for d in deltas]


def test_required_parser_streams_each_call_when_complete(rng):
    calls = [{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}, {"name": "ping", "parameters": {}}]
    text = json.dumps(calls, indent=rng.choice([None, 2]))
    parser = ToolCallParser(ToolMode("required", tuple(TOOLS)))
    content, deltas = _feed_in_pieces(parser, text, rng)
    assert content == "" and [d.index for d in deltas] == [0, 1]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parser.calls] == \
        [(c["name"], c["parameters"]) for c in calls]
    assert parser.message_content() is None


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tools_grammar_and_parallel_tool_calls(mini_tokenizer, parallel):
    constraint = tool_constraint(ToolMode("required", tuple(TOOLS), parallel=parallel))
    backend = StructuredBackend(mini_tokenizer, 4096, mini_tokenizer.eos_token_ids)
    state = backend.state(backend.compile(constraint.params))
    allowed = _allowed(state.next_mask(mini_tokenizer.encode('[{"name": "ping", "parameters": {}}')), 4096)
    comma, close = mini_tokenizer.encode(","), mini_tokenizer.encode("]")
    assert len(comma) == len(close) == 1 and close[0] in allowed
    assert (comma[0] in allowed) == parallel
    rejected = backend.state(backend.compile(constraint.params)).next_mask(mini_tokenizer.encode('[{"name": "pong"'))
    assert not _allowed(rejected, 4096)                      # a name that is not a tool's: nothing allowed


# ---- the engine ----------------------------------------------------------------------------------
def _run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
    assert engine.check_no_leak()
    return done


@pytest.mark.parametrize("steps", [1, 4])
def test_grammar_request_leaves_plain_neighbour_unchanged(steps, rng):
    engine = LLMEngine.from_args(EngineArgs(model=MINI, device="cpu", num_kv_blocks=2000, block_size=16,
                                            num_scheduler_steps=steps))
    plain = ("The old house", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    alone = _run(engine, {"p": plain})["p"][0]
    schema = person_schema(rng)
    spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    both = _run(engine, {"p": plain, "g": ("Data:", SamplingParams(max_tokens=120, temperature=1.0, n=2,
                                                                  seed=rng.randrange(1 << 30),
                                                                  structured_outputs=spec))})
    assert both["p"][0].token_ids == alone.token_ids
    for comp in both["g"]:
        assert comp.finish_reason == "stop"
        jsonschema.validate(json.loads(comp.text), schema)


def test_grammar_outputs_survive_preemption(rng):
    spec = StructuredOutputsParams(regex=r"[a-z]{30,60}\.")
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=rng.randrange(1 << 30), structured_outputs=spec)
              for _ in range(8)]
    prompts = [f"Item {i}: the long list of things that we want to write down today is" for i in range(8)]

    def run(pages: int) -> tuple[dict, int]:
        engine = LLMEngine.from_args(EngineArgs(model=MINI, device="cpu", num_kv_blocks=pages, block_size=4,
                                                max_num_batched_tokens=64))
        out = _run(engine, {str(i): (prompts[i], params[i]) for i in range(8)})
        return {k: v[0] for k, v in out.items()}, engine.scheduler.num_preemptions

    roomy, _ = run(4000)
    tight, preemptions = run(150)          # one sequence's worst case is 120 pages
    assert preemptions > 0
    assert {k: c.token_ids for k, c in tight.items()} == {k: c.token_ids for k, c in roomy.items()}
    for comp in tight.values():
        assert comp.finish_reason == "length" or re.fullmatch(r"[a-z]{30,60}\.", comp.text), comp.text


# ---- servers -------------------------------------------------------------------------------------
def _serve(model: str, **engine) -> ThreadedServer:
    args = dict(device="cpu", max_num_seqs=16, num_kv_blocks=2048, block_size=16, seed=0, **engine)
    settings = ServerSettings(model=model, served_model_names=["m"], max_num_seqs=16)
    app = create_app(settings, lambda: AsyncLLMEngine.from_args(EngineArgs(model=model, **args)))
    return ThreadedServer(app).start()


@pytest.fixture(scope="module")
def mini_srv():
    server = _serve(MINI)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smol_srv():
    server = _serve(SMOL, max_model_len=1024)
    yield server
    server.stop()


def _client(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _stream_text(chunks) -> tuple[str, str | None]:
    chunks = list(chunks)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason


def test_mini_completions_json_schema_and_json_object(mini_srv, rng):
    oai = _client(mini_srv)
    schema = person_schema(rng)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    resp = oai.completions.create(model="m", prompt="Record:", max_tokens=200, temperature=1.0,
                                  seed=rng.randrange(1 << 30), extra_body={"response_format": fmt})
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), schema)
    text, reason = _stream_text(oai.completions.create(
        model="m", prompt="Record:", max_tokens=200, temperature=0, stream=True,
        extra_body={"response_format": fmt}))
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    obj = oai.completions.create(model="m", prompt="JSON:", max_tokens=100, temperature=0,    # (free strings:
                                 extra_body={"response_format": {"type": "json_object"}})  # sampled, they run long)
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].text), dict)
    wait_idle(mini_srv)


def test_mini_completions_regex_choice_grammar_and_guided_names(mini_srv, rng):
    oai = _client(mini_srv)
    seed = rng.randrange(1 << 30)
    regex = r"[A-Z][a-z]{2,8}-\d{3}"
    choices = rng.sample(["red", "green", "blue", "cyan", "magenta"], 3)
    grammar = 'root ::= "(" num (op num)* ")"\nnum ::= [1-9] [0-9]?\nop ::= "+" | "*"'
    cases = [({"structured_outputs": {"regex": regex, "disable_fallback": True}}, lambda t: re.fullmatch(regex, t)),
             ({"guided_regex": regex}, lambda t: re.fullmatch(regex, t)),
             ({"structured_outputs": {"choice": choices}}, lambda t: t in choices),
             ({"guided_choice": choices}, lambda t: t in choices),
             ({"structured_outputs": {"grammar": grammar}}, lambda t: re.fullmatch(r"\((\d+[+*])*\d+\)", t)),
             ({"guided_grammar": grammar}, lambda t: re.fullmatch(r"\((\d+[+*])*\d+\)", t))]
    for k, (extra, valid) in enumerate(cases):
        for stream in (False, True) if k % 2 == 0 else (False,):
            kwargs = dict(model="m", prompt="Answer:", max_tokens=60, temperature=1.0, seed=seed, extra_body=extra)
            if stream:
                text, reason = _stream_text(oai.completions.create(stream=True, **kwargs))
            else:
                choice = oai.completions.create(**kwargs).choices[0]
                text, reason = choice.text, choice.finish_reason
            assert reason == "stop" and valid(text), (extra, text)
    schema = person_schema(rng)
    out = oai.completions.create(model="m", prompt="Row:", max_tokens=200, temperature=0,
                                 extra_body={"guided_json": schema, "guided_decoding_backend": "xgrammar"})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    wait_idle(mini_srv)


@pytest.mark.parametrize("extra, param", [
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " *"}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
])
def test_invalid_constraint_is_400_naming_the_field(mini_srv, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        _client(mini_srv).completions.create(model="m", prompt="x", max_tokens=4, extra_body=extra)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


def test_smol_chat_json_schema_stream_and_not(smol_srv):
    oai = _client(smol_srv)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "integer", "minimum": 0,
                                                                       "maximum": 100}},
              "required": ["capital", "population_millions"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "country", "schema": schema}}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    kwargs = dict(model="m", messages=messages, max_tokens=60, temperature=0, response_format=fmt)
    resp, chunks = _whole_and_streamed(oai, kwargs)
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content
    wait_idle(smol_srv)


def _whole_and_streamed(oai: openai.OpenAI, kwargs: dict) -> tuple:
    """The same chat request without and with streaming, sent at once (batched together)."""
    with ThreadPoolExecutor(2) as pool:
        whole = pool.submit(oai.chat.completions.create, **kwargs)
        streamed = pool.submit(lambda: list(oai.chat.completions.create(stream=True, **kwargs)))
        return whole.result(), streamed.result()


def _tool_dicts() -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in TOOLS]


def _check_call(name: str, arguments: str) -> None:
    tool = next(t for t in TOOLS if t.function.name == name)
    jsonschema.validate(json.loads(arguments), tool.function.parameters or {"type": "object"})


MESSAGES = [{"role": "user", "content": "What's the weather like in Paris, in Celsius?"}]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_smol_tool_calls_message_and_stream_deltas(smol_srv, tool_choice):
    oai = _client(smol_srv)
    kwargs = dict(model="m", messages=MESSAGES, tools=_tool_dicts(), tool_choice=tool_choice, max_tokens=80,
                  temperature=0)
    resp, chunks = _whole_and_streamed(oai, kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    whole = choice.message.tool_calls
    assert whole and all(c.type == "function" and c.id for c in whole)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in whole] == ["get_weather"]
    for call in whole:
        _check_call(call.function.name, call.function.arguments)

    calls: dict[int, dict] = {}
    for chunk in chunks:
        assert chunk.choices[0].delta.content in (None, "")
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id is not None:         # the first delta of a call: id, type, name
                assert delta.index not in calls and delta.type == "function" and delta.function.name
                calls[delta.index] = {"name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]
    wait_idle(smol_srv)


def test_smol_tool_choice_auto_none_and_bad_choices(smol_srv):
    oai = _client(smol_srv)
    with pytest.raises(openai.BadRequestError) as err:     # SmolLM2's template has no tool-call format
        oai.chat.completions.create(model="m", messages=MESSAGES, tools=_tool_dicts(), max_tokens=8)
    assert err.value.body["param"] == "tool_choice" and "chat template" in err.value.body["message"]
    plain = oai.chat.completions.create(model="m", messages=MESSAGES, tools=_tool_dicts(), tool_choice="none",
                                        max_tokens=3, temperature=0)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    for tool_choice, tools in [({"type": "function", "function": {"name": "nope"}}, _tool_dicts()),
                               ("required", None)]:
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="m", messages=MESSAGES, tools=tools, tool_choice=tool_choice,
                                        max_tokens=8)
        assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="m", messages=MESSAGES, tools=_tool_dicts(), tool_choice="required",
                                    response_format={"type": "json_object"}, max_tokens=8)
    assert err.value.body["param"] == "tools"


HERMES_TEMPLATE = ("{% if tools %}<|system|>{{ tools | tojson }}\nAnswer with <tool_call>{...}</tool_call>\n{% endif %}"
                   "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                   "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
                   "\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_auto_tool_choice_with_a_hermes_template(tmp_path):
    """A template with a tool-call format: "auto" is accepted, the tools reach the template, and free
    text (a random model's) stays content, streamed or not."""
    ckpt = write_checkpoint(tmp_path / "hermes", HERMES_TEMPLATE)
    server = _serve(str(ckpt))
    try:
        oai = _client(server)
        call = {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": '{"n": 1}'}}
        tools = _tool_dicts()[1:]                                                          # 256-token context
        messages = [{"role": "user", "content": "ping?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "c1", "content": "pong"}]
        kwargs = dict(model="m", messages=messages, tools=tools, max_tokens=12, temperature=0)
        resp = oai.chat.completions.create(**kwargs)
        # the template sees the earlier call's arguments as an object (as vLLM passes them)
        as_template_sees = [{**m, "content": m["content"] or ""} for m in messages]
        as_template_sees[1]["tool_calls"] = [{**call, "function": {"name": "ping", "arguments": {"n": 1}}}]
        rendered = Tokenizer.load(ckpt).apply_chat_template(as_template_sees, tools=tools)
        assert '"ping"' in rendered and '<tool_call>{"n": 1}</tool_call>' in rendered
        assert resp.usage.prompt_tokens == len(rendered.encode())                         # byte-level
        choice = resp.choices[0]
        assert choice.finish_reason == "length" and not choice.message.tool_calls and choice.message.content
        chunks = list(oai.chat.completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
        wait_idle(server)
    finally:
        server.stop()


def test_smol_vocabulary_mapping(smol_srv, rng):
    tokenizer = smol_srv.engine.tokenizer
    check_vocabulary_mapping(tokenizer, smol_srv.engine.model_config.vocab_size, rng)
