"""Installs as users make them, outside this checkout's editable install.

- The GPU installs resolve: the Requires-Dist of exactly the torch each Dockerfile installs, and of
  the torch releases morserve supports on Linux x86_64, read from the registry's metadata with
  `pip install --dry-run --report` (no wheel is downloaded), are checked with `packaging` against
  morserve's own requirements (pyproject.toml): every pin (triton==...) must be admitted, and the
  shared requirements must be satisfiable together by a wheel of that platform. Needs PyPI.
- The triton releases the kernel tests run under (scripts/test_kernels_triton.py) are the ones
  those torch releases pin, and morserve's range admits each.
- A wheel built from the sdist, installed in a scratch venv, serves the default model over HTTP
  from a directory outside the checkout, and says what is wrong if that model is missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import tomllib
import zipfile
from functools import cache
from pathlib import Path

import importlib.util

import httpx
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
SUPPORTED_TORCH = ["2.11.0", "2.13.0"]
PLATFORM = "manylinux_2_28_x86_64"
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}  # python3 of the Ubuntu releases CUDA images build on


def kernel_test_tritons() -> dict[str, list[str]]:
    """scripts/test_kernels_triton.py's SUPPORTED: the triton releases the kernel tests run under."""
    spec = importlib.util.spec_from_file_location("test_kernels_triton", REPO / "scripts" / "test_kernels_triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUPPORTED


def linux_env(python: str) -> dict[str, str]:
    """Marker environment of CPython `python` on Linux x86_64."""
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", platform_system="Linux",
               sys_platform="linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython", extra="")
    return env


def applicable(requirements: list[str], env: dict[str, str]) -> dict[str, Requirement]:
    out = {}
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            out[canonicalize_name(req.name)] = req
    return out


def host_resolves(url: str) -> bool:
    try:
        socket.getaddrinfo(re.sub(r"^\w+://([^/:]+).*", r"\1", url), 443)
        return True
    except OSError:
        return False


@cache
def dry_run(requirements: tuple[str, ...], python: str, index: str | None = None) -> dict[str, dict]:
    """{name: metadata} of what pip picks for the requirements on Linux x86_64 (no deps, wheels
    only, nothing downloaded but metadata), from PyPI (plus `index`) as on a user's machine: this
    machine's pip configuration (a local wheel directory, local indexes) is left out, except as the
    stand-in for an `index` this machine cannot reach (its local wheel directory holds that file)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--no-deps",
           "--only-binary=:all:", "--platform", PLATFORM, "--python-version", python,
           "--target", str(Path(tempfile.gettempdir()) / "morserve-dry-run"), "--disable-pip-version-check",
           *requirements]
    if index and host_resolves(index):
        cmd += ["--extra-index-url", index]
    elif index:
        env = None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"pip cannot resolve {requirements} for Python {python}:\n{done.stderr[-3000:]}"
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]
            for item in json.loads(done.stdout)["install"]}


def dockerfile_install(name: str) -> tuple[str, str, str | None]:
    """(torch requirement, image Python, extra index) that Dockerfile `name` installs with."""
    text = (REPO / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    official, ubuntu = re.match(r"python:(3\.\d+)", base), re.search(r"ubuntu(\d\d\.\d\d)", base)
    python = official.group(1) if official else UBUNTU_PYTHON.get(ubuntu.group(1)) if ubuntu else None
    assert python, f"{name}: which Python does {base} have? (UBUNTU_PYTHON)"
    return args["MORSERVE_TORCH_SPEC"], python, args.get("TORCH_INDEX")


def check_torch_fits(torch_spec: str, python: str, index: str | None = None) -> dict[str, Requirement]:
    """Assert morserve's requirements admit torch_spec's torch and everything it pins; returns
    torch's requirements that morserve shares."""
    env = linux_env(python)
    ours = applicable(PROJECT["dependencies"], env)
    torch = dry_run((torch_spec,), python, index)["torch"]
    version = Version(torch["version"])
    assert ours["torch"].specifier.contains(version, prereleases=True), \
        f"morserve requires {ours['torch']}, the install brings torch {version}"
    theirs = applicable(torch.get("requires_dist", []), env)
    shared = {name: req for name, req in theirs.items() if name in ours}
    for name, req in shared.items():
        for pin in (s.version for s in req.specifier if s.operator == "=="):
            assert ours[name].specifier.contains(pin, prereleases=True), \
                f"torch {version} pins {req}; morserve requires {ours[name]}"
    # Satisfiable together: pip finds one wheel per shared name meeting both specifiers.
    both = tuple(f"{name}{ours[name].specifier & req.specifier}" for name, req in shared.items())
    found = dry_run(both, python)
    for name, req in shared.items():
        assert (req.specifier & ours[name].specifier).contains(found[name]["version"], prereleases=True)
    return shared


# ---- the GPU installs resolve --------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_torch_fits_morserve(dockerfile):
    torch_spec, python, index = dockerfile_install(dockerfile)
    assert Requirement(torch_spec).specifier.contains(
        dry_run((torch_spec,), python, index)["torch"]["version"], prereleases=True)
    shared = check_torch_fits(torch_spec, python, index)
    if "+cpu" in torch_spec:
        assert "triton" not in shared, "the CPU wheel needs no triton"
    else:
        assert "triton" in shared, "the CUDA wheel pins its triton"


@pytest.mark.parametrize("torch_version", SUPPORTED_TORCH)
def test_pip_install_with_supported_torch_resolves(torch_version):
    shared = check_torch_fits(f"torch=={torch_version}", "3.11")
    pins = [s.version for s in shared["triton"].specifier if s.operator == "=="]
    assert pins and set(pins) <= set(kernel_test_tritons()), \
        f"torch {torch_version} brings triton {pins}; the kernel tests cover {sorted(kernel_test_tritons())}"


def test_pip_install_without_torch_picks_a_fitting_torch():
    """`pip install morserve` on a bare Linux machine: the newest torch morserve admits fits."""
    ours = applicable(PROJECT["dependencies"], linux_env("3.12"))
    newest = dry_run((str(ours["torch"]),), "3.12")["torch"]["version"]
    check_torch_fits(f"torch=={newest}", "3.12")


def test_tested_tritons_are_admitted_and_numpy_is_capped_only_for_them():
    ours = applicable(PROJECT["dependencies"], linux_env("3.12"))
    assert all(ours["triton"].specifier.contains(v) for v in kernel_test_tritons())
    assert not any(s.operator in ("<", "<=", "==", "~=") for s in ours["numpy"].specifier), \
        "a numpy cap belongs to the triton release that needs it (scripts/test_kernels_triton.py)"
    assert "triton" not in applicable(PROJECT["dependencies"], {**linux_env("3.12"), "platform_system": "Darwin"})


# ---- the wheel ships and serves the default model ---------------------------------------------------
def build(tmp: Path) -> Path:
    """sdist from this checkout, then the wheel from the unpacked sdist (what `pip install` of an
    sdist does): the wheel only holds what the sdist carries."""
    def backend(call: str, cwd: Path) -> str:
        done = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.{call})"],
                              cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    sdist = tmp / backend(f"build_sdist({str(tmp)!r})", REPO)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "src", filter="data")
    (source,) = (tmp / "src").iterdir()
    return tmp / backend(f"build_wheel({str(tmp)!r})", source)


def outside_env() -> dict[str, str]:
    """This environment without the checkout on PYTHONPATH (nor the kernel tests' interpreter switch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return dict(env, OMP_NUM_THREADS="1")


def scratch_venv(path: Path, wheel: Path) -> Path:
    """A venv with the wheel installed (no deps); its other packages come from this interpreter's
    site-packages through a .pth file, which neither runs that site's .pth files (so not the
    checkout's editable finder) nor precedes the venv's own site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300, env=outside_env())
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    parents = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_parent_env.pth").write_text("".join(f"{p}\n" for p in parents))
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wheel_serves_default_model_outside_checkout(tmp_path):
    wheel = build(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO / "models")) for p in (REPO / "models").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert {n.removeprefix("morserve_models/") for n in names if n.startswith("morserve_models/")} == shipped
    packages = {str(p.parent.relative_to(REPO)) for d in ("morserve", "kernels") for p in (REPO / d).rglob("__init__.py")}
    assert packages <= {n.rsplit("/", 1)[0] for n in names}
    assert not any(n.startswith(("models/", "tests/")) for n in names)

    venv = tmp_path / "venv"
    python = scratch_venv(venv, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = outside_env()
    where = subprocess.run([str(python), "-c", "import json, kernels, morserve, morserve.checkpoint.pretrained as p; "
                            "print(json.dumps([morserve.__file__, kernels.__file__, str(p.MODELS_DIR)]))"],
                           cwd=outside, env=env, capture_output=True, text=True, check=True)
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(venv), f"{path} is not the wheel's copy"
    assert Path(json.loads(where.stdout)[2]).name == "morserve_models"

    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "morserve"), "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--device", "cpu", "--log-level", "warning"],
                              cwd=outside, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    prompt = "Once upon a time"
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the installed server did not become healthy"
            time.sleep(0.2)
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json=dict(model="morserve-mini-mor3", prompt=prompt, max_tokens=8, temperature=0,
                                     ignore_eos=True, return_depths=True))
    finally:
        server.terminate()
        server.wait(30)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert reply.json()["model"] == "morserve-mini-mor3" and reply.json()["usage"]["completion_tokens"] == 8

    from morserve import LLM, SamplingParams  # this checkout's engine on this checkout's models/
    expected = LLM(model="morserve-mini-mor3", device="cpu").generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    assert (choice["text"], choice["depths"]) == (expected.text, expected.depths)

    default_model = Path(json.loads(where.stdout)[2]) / "morserve-mini-mor3"
    (default_model / "model.safetensors").unlink()
    missing = subprocess.run([str(python), "-c", "from morserve import LLM; LLM()"], cwd=outside, env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0
    message = missing.stderr.strip().splitlines()[-1]
    assert "CheckpointError" in message and str(default_model) in message and "reinstall morserve" in message
    assert "train" not in message


def test_checkout_uses_its_own_models_folder():
    """From a source tree (this checkout, editable installs, the Docker images) the default model is
    read from models/ itself, so edits there take effect without a reinstall."""
    from morserve.checkpoint import pretrained
    assert pretrained.MODELS_DIR == REPO / "models"
    assert (REPO / "models" / "__init__.py").is_file(), "models/ installs as the package morserve_models"
