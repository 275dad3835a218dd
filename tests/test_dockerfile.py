"""The Dockerfiles (no Docker engine here, so: static checks) install through the one install path
(scripts/install.sh), run as a non-root user, expose 8000 and serve the default model on 0.0.0.0."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form: {args}"
    return value


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_serves_default_model_as_non_root(name):
    ins = instructions(REPO / name)
    kinds = [k for k, _ in ins]
    assert kinds[0] in ("FROM", "ARG") and "FROM" in kinds
    runs = [a for k, a in ins if k == "RUN"]
    install = [i for i, (k, a) in enumerate(ins) if k == "RUN" and "scripts/install.sh" in a]
    assert len(install) == 1, "install through scripts/install.sh, once"
    assert "MORSERVE_TORCH_SPEC" in ins[install[0]][1]
    assert not any(re.search(r"pip3? install", a) for a in runs), "no pip install beside the shared install path"
    users = [(i, a) for i, (k, a) in enumerate(ins) if k == "USER"]
    assert users and users[-1][1] not in ("root", "0") and users[-1][0] < install[0], \
        "install and run as the non-root user"
    assert any(k == "RUN" and "useradd" in a and users[-1][1] in a for k, a in ins)
    assert ("EXPOSE", "8000") in ins
    entry = exec_form(next(a for k, a in reversed(ins) if k == "ENTRYPOINT"))
    cmd = exec_form(next(a for k, a in reversed(ins) if k == "CMD"))
    argv = entry + cmd
    assert argv[:2] == ["morserve", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--model") + 1] == "morserve-mini-mor3"
    assert "COPY" in kinds


def test_gpu_image_is_cuda_and_cpu_image_uses_cpu_torch():
    gpu = (REPO / "Dockerfile").read_text()
    cpu = (REPO / "Dockerfile.cpu").read_text()
    assert re.search(r"nvidia/cuda:\S+", gpu)
    assert "+cpu" in cpu and "download.pytorch.org/whl/cpu" in cpu and "nvidia/cuda" not in cpu


def test_install_script_accepts_what_the_dockerfiles_pass():
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "MORSERVE_TORCH_SPEC" in script and '"$VENV" = "-"' in script


def test_dockerignore_keeps_local_state_out_and_sources_in():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    assert not ignored & {"models", "scripts", "morserve", "pyproject.toml", "setup.py", "kernels"}
