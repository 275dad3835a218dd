"""The `--threads` flag of every compute command (train, analyze, generate, serve).

Default 1: the models these commands usually run are tiny, and on a shared CPU a second OpenMP
thread per process made steps about 5x slower (contention, measured on the 2-core development
machine). Raise it for bigger models on a machine of your own. It has no effect on GPU kernels.
"""

from __future__ import annotations

import argparse

import torch

DEFAULT_THREADS = 1


def set_threads(threads: int | None) -> None:
    """torch CPU threads (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def add_threads_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch CPU threads (default {DEFAULT_THREADS}; see morserve/threads.py)")
