"""Kernels of the engine's hot path: row gather/scatter, paged KV store, paged attention.

Each op has a pure-PyTorch reference (kernels.reference) with the same signature.
"""

from kernels.reference import gather_rows, gather_rows_rmsnorm, paged_attention, scatter_rows, store_kv

__all__ = ["gather_rows", "gather_rows_rmsnorm", "paged_attention", "scatter_rows", "store_kv"]
