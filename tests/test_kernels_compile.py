"""Every Triton kernel compiles for sm_90 (H100/H200) with the installed triton, no GPU needed, in
the exact launch configurations its wrapper picks for the shipped models' shapes and a Llama-sized
one (tests/kernel_compile.py records them). scripts/test_kernels_triton.py runs this file under
each other supported triton release too.

It runs in a subprocess without TRITON_INTERPRET (test_kernels.py sets it on CPU, and it binds
every @triton.jit function of the process to the interpreter), with a fresh Triton cache so that
every kernel really goes through the compiler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

REPO = Path(__file__).resolve().parents[1]
MINI_MOR3 = json.loads((REPO / "models" / "morserve-mini-mor3" / "config.json").read_text())
SHAPES = [  # hidden, heads, kv heads, head dim of: morserve-mini-mor3, SmolLM2-135M, a Llama-8B layer
    dict(hidden=MINI_MOR3["hidden_size"], heads=MINI_MOR3["num_attention_heads"],
         kv_heads=MINI_MOR3["num_key_value_heads"], head_dim=MINI_MOR3["head_dim"], page=16),
    dict(hidden=576, heads=9, kv_heads=3, head_dim=64, page=16),
    dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, page=16),
]


def compile_all(spec: dict, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "kernel_compile.py"), json.dumps(spec)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_sm90(tmp_path: Path) -> None:
    cases = [dict(shape, dtype="bfloat16") for shape in SHAPES] + [dict(SHAPES[0], dtype="float32")]
    result = compile_all(dict(capability=90, cases=cases), tmp_path)
    assert result["triton"] == triton.__version__
    launches = result["compiled"]
    assert {c["kernel"] for c in launches} == set(result["kernels"]), "a kernel the wrappers never launched"
    assert len(result["kernels"]) >= 4
    for c in launches:
        assert c["ptx_target"].startswith("sm_90"), c
        assert c["name"] == c["kernel"].rsplit(".", 1)[1] and c["cubin_bytes"] > 0, c
    attention = [c["constexprs"] for c in launches if c["kernel"].endswith("_paged_attention_kernel")]
    assert {a["DOT_PRECISION"] for a in attention} == {"tf32", "ieee"} and not any(a["UPCAST"] for a in attention)
    assert {(a["GROUP"], a["HEAD_DIM"]) for a in attention} == {(s["heads"] // s["kv_heads"], s["head_dim"])
                                                                 for s in SHAPES}
