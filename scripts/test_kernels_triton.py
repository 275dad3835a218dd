"""The kernel tests (tests/test_kernels*.py: the Triton interpreter on CPU, the sm_90 compile) under
every supported triton release other than the one installed beside this interpreter.

Each release gets a scratch venv, <root>/triton-<release> (reused while it holds that release; root:
$MORSERVE_TRITON_VENVS, else this interpreter's venv), into
which only that triton and the pins its interpreter needs are installed; torch, pytest and the
rest come from this interpreter's site-packages through a .pth file, which Python puts after the
venv's own site-packages, so the scratch triton wins. The interpreter-driven engine test of
test_kernels.py is left out there: it checks the engine, not the kernels, and is the slow part.

Usage (make test runs it after the suite): python scripts/test_kernels_triton.py [PYTEST_ARGS...]
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Release -> what else its scratch venv needs. triton 3.6's interpreter fails on numpy >= 2.4 (its
# tensor __index__ converts a 1-element array; triton 3.7 squeezes it first).
SUPPORTED: dict[str, list[str]] = {"3.6.0": ["numpy<2.4"], "3.7.1": []}
SKIP = "not engine_on_interpreted_kernels"


def installed_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def site_dirs() -> list[str]:
    """This interpreter's site-packages directories, with any that its .pth files put on sys.path."""
    own = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return list(dict.fromkeys(own + [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]))


def scratch_venv(release: str, root: Path) -> Path:
    """The python of a venv holding triton==release (+ its pins) over this interpreter's packages."""
    venv = root / f"triton-{release}"
    python = venv / "bin" / "python"
    wanted = [f"triton=={release}", *SUPPORTED[release]]
    stamp = venv / "morserve-requirements.txt"
    if not (python.exists() and stamp.exists() and stamp.read_text().split() == wanted):
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", site, *wanted], check=True)
        (Path(site) / "_morserve_parent_env.pth").write_text("".join(f"{p}\n" for p in site_dirs()))
        stamp.write_text("\n".join(wanted))
    found = subprocess.run([str(python), "-c", "import triton; print(triton.__version__, triton.__file__)"],
                           check=True, capture_output=True, text=True).stdout.split()
    if found[0] != release or not Path(found[1]).is_relative_to(venv):
        raise SystemExit(f"{venv} imports triton {found[0]} from {found[1]}, not its own {release}")
    return python


def main(pytest_args: list[str]) -> int:
    if sys.platform != "linux":
        print("test_kernels_triton: triton ships Linux wheels only; nothing to do here")
        return 0
    current = installed_triton()
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernels*.py"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    for release in SUPPORTED:
        if release == current:
            continue
        start = time.monotonic()
        python = scratch_venv(release, Path(os.environ.get("MORSERVE_TRITON_VENVS", sys.prefix)))
        ready = time.monotonic()
        done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SKIP,
                               *tests, *pytest_args], cwd=REPO, env=env)
        print(f"test_kernels_triton: triton {release}: venv {ready - start:.0f} s, tests "
              f"{time.monotonic() - ready:.0f} s, exit {done.returncode}")
        if done.returncode:
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
