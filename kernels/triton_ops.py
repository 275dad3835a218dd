"""The Triton implementation of every op in kernels.reference, with the same signatures.

These run the kernels unconditionally: they need CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
was set before this module was first imported (triton 3.6 binds a kernel to the interpreter when it
is decorated). `INTERPRETED` tells which mode this process got.
"""

from kernels._launch import INTERPRETED
from kernels.activation import silu_mul
from kernels.attention import paged_attention
from kernels.kv_store import store_kv, store_kv_rope
from kernels.lm_tail import lm_head_tail
from kernels.loop_state import loop_block_exit, loop_block_meta, loop_emit, loop_prologue_rows
from kernels.norms import add_rmsnorm, rms_norm
from kernels.route import expert_decide, scatter_stream, token_decide, update_expert, update_plain, update_token
from kernels.rows import gather_rows, gather_rows_rmsnorm, scatter_rows

__all__ = ["INTERPRETED", "add_rmsnorm", "expert_decide", "gather_rows", "gather_rows_rmsnorm", "lm_head_tail",
           "paged_attention", "rms_norm", "scatter_rows", "scatter_stream", "silu_mul", "store_kv", "store_kv_rope",
           "token_decide", "update_expert", "update_plain", "update_token",
           "loop_block_exit", "loop_block_meta", "loop_emit", "loop_prologue_rows"]
