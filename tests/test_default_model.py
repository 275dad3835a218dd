"""The shipped default model as a user meets it: its README samples come out of its own README
command, a chat completion answers through the server's chat path (the model ships a chat
template), and `morserve generate --chat` on a model without one fails cleanly."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

from fastapi.testclient import TestClient

from engine_utils import one_thread  # noqa: F401 - autouse fixture: one torch thread
from morserve.api.server import create_app
from morserve.api.state import ServerSettings
from morserve.checkpoint import save_checkpoint
from morserve.config import ModelConfig, MoRConfig
from morserve.engine import LLM, AsyncLLMEngine, EngineArgs, SamplingParams
from morserve.engine import cli as generate_cli
from morserve.model import MoRModel
from morserve.tokenizer import Tokenizer

README = Path(__file__).resolve().parents[1] / "models" / "morserve-mini-mor3" / "README.md"
MODEL = "morserve-mini-mor3"




def _readme_sample_section() -> tuple[list[str], str]:
    """(argv of the README's generate command, its recorded output)."""
    section = README.read_text().split("## Sample generations", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == [".venv/bin/morserve", "generate"], argv
    output = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return argv[2:], output


def test_readme_samples_reproduce_with_the_readme_command(capsys):
    argv, recorded = _readme_sample_section()
    first_prompt = argv[argv.index("--prompt") + 1]
    assert generate_cli.main(argv) == 0
    printed = capsys.readouterr().out
    first = recorded.split("\n### ")[0]
    assert first.startswith(f"### {first_prompt}\n") and "depths" in first
    assert printed.startswith(first), (printed[:400], first[:400])


def test_chat_completion_answers_on_the_default_model():
    messages = [{"role": "system", "content": "You answer questions about Python."},
                {"role": "user", "content": "What does the open function return?"}]
    app = create_app(ServerSettings(model=MODEL, served_model_names=[MODEL]),
                     lambda: AsyncLLMEngine.from_args(EngineArgs(model=MODEL, device="cpu", seed=0)))
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the default model did not load"
            time.sleep(0.2)
        response = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "return_depths": True})
        bad_role = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}], "max_tokens": 2})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    usage = response.json()["usage"]
    assert choice["message"]["content"] and len(choice["depths"]) == usage["completion_tokens"] == 12
    llm = LLM(model=MODEL, device="cpu")
    prompt = llm.tokenizer.apply_chat_template(messages)
    assert prompt.endswith("Question: What does the open function return?\nAnswer:")
    offline = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert choice["message"]["content"] == offline.text and choice["depths"] == offline.depths
    assert bad_role.status_code == 400 and "roles system, user and assistant" in bad_role.text


def test_generate_chat_without_a_template_is_a_clean_error(tmp_path, capsys):
    tokenizer = Tokenizer.byte_level()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, max_position_embeddings=64, mor=MoRConfig())
    path = save_checkpoint(MoRModel(cfg).init_weights(seed=1), tokenizer, tmp_path / "plain")
    assert generate_cli.main(["--model", str(path), "--prompt", "hi", "--chat", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "Traceback" not in err
