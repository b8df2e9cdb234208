"""Quantized serving: FP8 weights and activations, 4-bit weight-only checkpoints (AWQ,
GPTQ), an FP8 KV cache.

`spec` checks the setting at engine construction (`QuantSpec`); `loader` loads the
quantized linear layers into the `packed` slot that GGUF's CPU kernels also use; `fp8` /
`int4` are the layers' weights and their matmuls (Triton kernels in `fp8_kernels` /
`int4_kernels`, one-row GEMVs in `fp8_gemv` / `int4_gemv`, their split finish in
`gemv_split`, the gated gate / up form in `gated`); `kv_cache` resolves
``kv_cache_dtype`` and loads the cache scales.
"""
