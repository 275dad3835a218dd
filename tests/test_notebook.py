"""docs/quickstart.ipynb runs from top to bottom (nbclient, a fresh kernel) and says what it
should: a trained model above the trivial baseline, a depth per kind, a served completion."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.get("outputs", []))


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    acc, base = map(float, re.search(r"accuracy ([\d.]+)% vs trivial baseline ([\d.]+)%", out).groups())
    assert acc > base + 10, out
    for kind in ("source", "delimiter", "copy", "end"):
        assert re.search(rf"^{kind}\s+(yes|no)\s", out, re.M), kind
    assert re.search(r"routing entropy [\d.]+ nats of at most 0.693", out)
    assert re.search(r"\[\d\]", out)                      # depth annotations
    assert "same tokens and depths as lab.generate:" in out
