"""Fused CPU kernels for the bf16 decode step, in C, built once per machine.

A batch-1 decode step of a small model on the CPU spent more time dispatching small torch
ops (norms, rotary, the decode attention's gathers and SDPA call) than in its matmuls.
`kernels.c` does each of those steps in one call: residual add + RMSNorm and rotary and
SiLU-and-mul bit for bit as torch's ops round them, and the decode attention reading the
paged KV cache in place (float32 arithmetic). `build` compiles it with the system C
compiler into ``$PAGEDLLM_CACHE_DIR/cpu-kernels`` and loads it with ctypes; `ops` is the
torch-facing API the layers call (`ops.get()`, None without a compiler or with
``PAGEDLLM_CPU_KERNELS=0``, when the torch code runs as before).
"""
