"""Quantized checkpoints made from a tiny random HF model, with reference packings written
here from the published formats (not pagedllm's code):

* FP8: compressed-tensors ``float-quantized`` (weight_scale per channel [N, 1] or per tensor
  [1]; static ``input_scale`` or dynamic) and the ``fp8`` method (per-tensor scales,
  ``activation_scheme``).
* AWQ (GEMM): qweight int32 [K, N / 8] with nibble i holding column 8 c + (0, 2, 4, 6, 1,
  3, 5, 7)[i], qzeros alike [G, N / 8], scales fp16 [G, N]; w = (q - z) s.
* GPTQ v1: qweight int32 [K / 8, N] (nibble j of row i: input 8 i + j), qzeros [G, N / 8]
  storing z - 1 sequentially along N, scales fp16 [G, N], g_idx [K]; act-order picks a
  permutation per input (shared by the layers that read the same input, as GPTQ's Hessian
  order is) and groups inputs in that order.

Each writer also saves the dequantized weights as a dense float32 folder: the reference
model that HF transformers runs.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

# |log p(FP8) - log p(dense)| of the top tokens of a tiny random model (hidden 64, logits
# near uniform): e4m3 weights and activations shift logits by ~2^-5 of their size per
# layer; measured up to 0.24, bound 0.4.
FP8_LOGPROB_ERROR = 0.4

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Which input a layer reads: layers of one input share GPTQ's act-order permutation.
_INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down"}


def _copy_folder(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def _linear_name(name: str) -> str | None:
    parts = name.split(".")
    ok = len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEARS
    return parts[-2] if ok else None


def _save(src: str, dst: str, tensors: dict[str, torch.Tensor],
          quantization_config: dict | None) -> None:
    _copy_folder(src, dst)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(dst, "model.safetensors"))
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def _state(src: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(src, "model.safetensors"))


# --------------------------------------------------------------------------- FP8
def fp8_checkpoint(src: str, dst: str, ref: str, method: str = "compressed-tensors",
                   strategy: str = "channel", activation: str = "dynamic",
                   kv_scales: float | None = None) -> None:
    """An FP8 checkpoint of `src` in `dst`, and its dequantized weights in `ref`."""
    fp8 = torch.float8_e4m3fn
    state = _state(src)
    out, dense = {}, {}
    for name, w in state.items():
        if _linear_name(name) is None:
            out[name] = dense[name] = w
            continue
        wf = w.float()
        if strategy == "channel":
            scale = wf.abs().amax(dim=1, keepdim=True) / 448.0
        else:
            scale = wf.abs().amax().reshape(1) / 448.0
        q = (wf / scale).clamp(-448, 448).to(fp8)
        stem = name.removesuffix(".weight")
        out[name] = q
        out[stem + ".weight_scale"] = scale.float()
        if activation == "static":
            out[stem + ".input_scale"] = torch.tensor([0.02])
        dense[name] = q.float() * scale
    if kv_scales is not None:
        for name in list(state):
            if name.endswith("self_attn.k_proj.weight"):
                stem = name.removesuffix("k_proj.weight")
                out[stem + "k_scale"] = torch.tensor(kv_scales)
                out[stem + "v_scale"] = torch.tensor(kv_scales * 2)
    if method == "compressed-tensors":
        acts = {"num_bits": 8, "type": "float", "symmetric": True,
                "strategy": "token" if activation == "dynamic" else "tensor",
                "dynamic": activation == "dynamic"}
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                              "strategy": strategy, "dynamic": False},
                  "input_activations": acts}},
              "ignore": ["lm_head"], "quantization_status": "compressed"}
    else:
        qc = {"quant_method": "fp8", "activation_scheme": activation}
    _save(src, dst, out, qc)
    _save(src, ref, dense, None)


# --------------------------------------------------------------------------- int4
def quantize_groups(w: torch.Tensor, group: int, order: torch.Tensor | None = None,
                    min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """Asymmetric 4-bit quantization of W [N, K] in groups of inputs (taken in `order`).
    Returns codes [N, K] (input order), zeros [G, N], scales fp16 [G, N], g_idx [K]."""
    n, k = w.shape
    order = torch.arange(k) if order is None else order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    groups = k // group
    codes = torch.empty(n, k, dtype=torch.int32)
    zeros = torch.empty(groups, n, dtype=torch.int32)
    scales = torch.empty(groups, n, dtype=torch.float16)
    for g in range(groups):
        cols = order[g * group:(g + 1) * group]
        block = w[:, cols].float()
        lo = block.amin(dim=1).clamp(max=0)
        hi = block.amax(dim=1).clamp(min=0)
        s = ((hi - lo) / 15).clamp_min(1e-8).half()
        z = torch.round(-lo / s.float()).clamp(min_zero, 15).to(torch.int32)
        q = torch.clamp(torch.round(block / s.float()[:, None]) + z[:, None], 0, 15)
        codes[:, cols] = q.to(torch.int32)
        zeros[g] = z
        scales[g] = s
    return codes, zeros, scales, g_idx


def dequantize_groups(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor) -> torch.Tensor:
    """Reference dequantization: W[n, k] = (q - z[g(k), n]) * s[g(k), n] in float32."""
    g = g_idx.long()
    return (codes.float() - zeros.float().t()[:, g]) * scales.float().t()[:, g]


def pack_cols(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int [R, C] -> int32 [R, C / 8]: nibble i of column c holds value column 8 c + order[i]."""
    r, c = values.shape
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for col in range(c // 8):
        for i in range(8):
            out[:, col] |= (values[:, col * 8 + order[i]].to(torch.int64) & 0xF) << (4 * i)
    return _to_int32(out)


def pack_gptq_rows(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> GPTQ qweight int32 [K / 8, N] (nibble j of row i: input 8 i + j)."""
    ct = codes.t().to(torch.int64)
    qweight = torch.zeros(ct.shape[0] // 8, ct.shape[1], dtype=torch.int64)
    for j in range(8):
        qweight |= (ct[j::8] & 0xF) << (4 * j)
    return _to_int32(qweight)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values in int64 -> int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def awq_checkpoint(src: str, dst: str, ref: str, group: int = 32) -> None:
    """An AWQ (GEMM) checkpoint of `src` in `dst`, and its dequantized weights in `ref`."""
    out, dense = {}, {}
    for name, w in _state(src).items():
        if _linear_name(name) is None:
            out[name] = dense[name] = w
            continue
        codes, zeros, scales, g_idx = quantize_groups(w, group)
        stem = name.removesuffix(".weight")
        out[stem + ".qweight"] = pack_cols(codes.t(), AWQ_ORDER)  # [K, N / 8]
        out[stem + ".qzeros"] = pack_cols(zeros, AWQ_ORDER)  # [G, N / 8]
        out[stem + ".scales"] = scales
        dense[name] = dequantize_groups(codes, zeros, scales, g_idx)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
          "version": "gemm"}
    _save(src, dst, out, qc)
    _save(src, ref, dense, None)


def gptq_checkpoint(src: str, dst: str, ref: str, group: int = 32, desc_act: bool = False,
                    seed: int = 0) -> None:
    """A GPTQ (v1 format) checkpoint of `src` in `dst`; dequantized weights in `ref`."""
    gen = torch.Generator().manual_seed(seed)
    out, dense = {}, {}
    perms: dict[tuple[str, str], torch.Tensor] = {}
    for name, w in _state(src).items():
        linear = _linear_name(name)
        if linear is None:
            out[name] = dense[name] = w
            continue
        order = None
        if desc_act:
            key = (name.rsplit(".", 3)[0], _INPUT_OF[linear])
            if key not in perms:
                perms[key] = torch.randperm(w.shape[1], generator=gen)
            order = perms[key]
        # v1 stores z - 1 in 4 bits: a zero of 0 would not survive (GPTQ v1's known flaw)
        codes, zeros, scales, g_idx = quantize_groups(w, group, order, min_zero=1)
        stem = name.removesuffix(".weight")
        out[stem + ".qweight"] = pack_gptq_rows(codes)
        out[stem + ".qzeros"] = pack_cols(zeros - 1, tuple(range(8)))
        out[stem + ".scales"] = scales
        out[stem + ".g_idx"] = g_idx
        dense[name] = dequantize_groups(codes, zeros, scales, g_idx)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": desc_act,
          "sym": False, "checkpoint_format": "gptq"}
    _save(src, dst, out, qc)
    _save(src, ref, dense, None)


def compare_first_tokens(dense, quantized, prompts: list[list[int]],
                         bound: float = FP8_LOGPROB_ERROR) -> int:
    """Greedy next tokens of two LLMs on `prompts`: the top-20 logprobs they share differ by
    less than `bound`, and where the choices differ the dense model's own logprobs of the
    two are within 2 * bound (a near tie). Returns how many choices agree (at least half)."""
    from pagedllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    a = dense.generate(reqs, sp, use_tqdm=False)
    b = quantized.generate(reqs, sp, use_tqdm=False)
    agree = 0
    for x, y in zip(a, b):
        la, lb = x.outputs[0].logprobs[0], y.outputs[0].logprobs[0]
        ta, tb = x.outputs[0].token_ids[0], y.outputs[0].token_ids[0]
        common = [t for t in la if t in lb]
        assert len(common) >= 10
        worst = max(abs(la[t].logprob - lb[t].logprob) for t in common)
        assert worst < bound, worst
        if ta == tb:
            agree += 1
        else:
            assert tb in la and la[ta].logprob - la[tb].logprob < 2 * bound
    assert agree >= len(prompts) / 2, agree
    return agree
