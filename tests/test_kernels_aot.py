"""Every Triton kernel the engine launches compiles for sm_90 (H100/H200) without register spills:
`python -m kernels.aot --json` (see kernels/aot.py) run in a subprocess without TRITON_INTERPRET
(interpreted kernels cannot be compiled, and test_kernels.py sets it for this process). Needs no
GPU: Triton ships ptxas. `pytest -s` prints the registers / spills / shared memory table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def test_every_kernel_compiles_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "kernels.aot", "--json"], cwd=_REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"\n{'kernel':<22} {'dtypes':<10} {'regs':>4} {'spills':>7} {'shared':>7}  config")
    for row in rows:
        figures = (f"{row['regs']:>4} {row['spill_stores']:>3}/{row['spill_loads']:<3} {row['shared']:>7}"
                   if "error" not in row else "FAILED")
        print(f"{row['kernel']:<22} {row['dtypes']:<10} {figures}  {row['config']}")
    assert done.returncode == 0, done.stderr[-4000:] + "\n".join(r.get("error", "") for r in rows)
    from kernels.aot import kernel_functions
    assert {row["kernel"] for row in rows} == set(kernel_functions())
    assert {row["dtypes"].split("/")[0] for row in rows} >= {"bf16", "fp16", "fp32"}
    splits = {row["config"].split("NUM_SPLITS=")[1].split()[0] for row in rows if row["kernel"] == "_attention_kernel"}
    assert "1" in splits and len(splits) > 1                      # split-KV off and on
    assert all(row["spill_stores"] == row["spill_loads"] == 0 for row in rows)
