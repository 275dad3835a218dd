"""`morserve` console script: dispatches to the subcommands' own modules (imported lazily)."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("morserve.api.server", "OpenAI-compatible HTTP server"),
    "generate": ("morserve.engine.cli", "offline generation from the command line"),
    "train": ("morserve.train.command", "train a MoR model on a corpus or a synthetic task"),
    "convert": ("morserve.train.convert", "convert a vanilla Llama checkpoint into a MoR checkpoint"),
    "analyze": ("morserve.train.analyze", "routing analysis of a model (or --compare several) on a text or task"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: morserve {" + ",".join(SUBCOMMANDS) + "} [options]\n")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
