"""The prefix-cache, depth-cap and depth-policy benchmarks end to end at tiny sizes (the default
model, CPU): their tables, the exactness checks they report, the held-out loss helper."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import depth_caps, depth_policy, prefix_cache  # noqa: E402
from morserve.checkpoint import load_pretrained  # noqa: E402
from morserve.model import reference_forward  # noqa: E402


def test_prefix_cache_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "pc.json"
    prefix_cache.main(["--num-requests", "6", "--prefix-len", "48", "--suffix-len", "8", "--output-len", "2",
                       "--repeats", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| off |" in text and "| on |" in text
    result = json.loads(out.read_text())
    assert result["identical"]
    assert result["median"]["true"]["hit_rate"] >= 0.5 and result["median"]["false"]["hit_rate"] == 0.0


def test_depth_policy_benchmark_tiny(capsys):
    depth_policy.main(["--num-requests", "6", "--prompt-len", "4", "--output-len", "4", "--rate", "100",
                       "--max-num-seqs", "2", "--target", "0.01", "--repeats", "1"])
    text = capsys.readouterr().out
    assert "| fixed |" in text and "| adaptive |" in text
    assert "did not opt in identical in every run: True" in text


def test_heldout_loss_caps_depth_and_matches_full_depth_cross_entropy():
    model = load_pretrained(str(REPO / "models" / "morserve-mini-mor3"), device="cpu", dtype=torch.float32).model
    val = torch.randint(0, model.config.vocab_size, (3 * 16 + 1,))
    loss1, depth1, n = depth_caps.heldout_loss(model, val, 16, 1)
    loss3, depth3, _ = depth_caps.heldout_loss(model, val, 16, 3)
    assert depth1 == 1.0 and 1.0 < depth3 <= 3.0 and n == 48
    with torch.no_grad():                      # full depth: the reference logits' mean cross-entropy
        ref = reference_forward(model, val[:-1].view(3, 16))
    want = torch.nn.functional.cross_entropy(ref.logits.flatten(0, 1), val[1:].view(3, 16).flatten()).item()
    assert abs(loss3 - want) < 1e-5
