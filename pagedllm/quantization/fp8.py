"""FP8 (e4m3) linear layers: weights with one scale per output channel, activations
quantized per token (or with a checkpoint's static per-tensor scale), GEMM through
``torch._scaled_mm``; on CUDA at decode batch 1 (M <= ``GEMV_MAX_M`` rows) a Triton
weight-only GEMV instead (`fp8_gemv`: e4m3 codes converted in registers, the
activations stay in the model dtype, no quantization launch). `Fp8Weight.path` names the
choice for M rows.

``_scaled_mm`` with per-row scales (scale_a [M, 1], scale_b [1, N], float32) is the cuBLASLt /
CUTLASS row-wise FP8 GEMM on Hopper; torch has had it with bf16 output since 2.5 (fp16
output came later). `scaled_mm_mode` probes once per model which form this torch and GPU
take: ``rowwise`` (output in the model dtype), ``rowwise-bf16`` (bf16 out, cast) or
``tensor`` (unit per-tensor scales, float32 out, both scales applied after), which compute
the same products.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

import torch

from pagedllm.quantization.gated import GatedGemvWeight
from pagedllm.utils import sm_count

if TYPE_CHECKING:
    from pagedllm.quantization.gemv_split import GemvPlans

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # rows of zeros keep a finite scale
SCALED_MM_MODES = ("rowwise", "rowwise-bf16", "tensor")
# Rows up to which CUDA runs the weight-only GEMV (fp8_gemv): one, where an H200 measured it
# faster than per-token quantization + _scaled_mm (benchmarks/RESULTS.md).
GEMV_MAX_M = 1
FAST_ACCUM_ENV = "PAGEDLLM_FP8_FAST_ACCUM"  # "0": float32 promotion inside the FP8 GEMMs


class Fp8Activation(NamedTuple):
    """Activations already quantized for an FP8 linear: e4m3 codes [..., K] and float32
    per-row scales [..., 1] (x ~ codes * scales). The kernel before the linear (RMSNorm,
    SiLU-and-mul) makes them in place of its model-dtype output, as `quantize_tokens`
    quantizes that output (the same scales; a rare code one e4m3 step away, where the
    quotient's last bit differs), so the linear skips its own quantization pass."""

    codes: torch.Tensor
    scales: torch.Tensor


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (e4m3 codes [N, K], float32 scales [N]) with W ~ codes * scale[:, None]:
    each row's largest magnitude maps to 448."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(_MIN_SCALE)
    codes = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def quantize_tokens_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]): dynamic per-token quantization in
    torch ops (the CPU path, and the reference of the Triton kernel)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_static_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] with one given float32 scale [1] -> e4m3 [M, K]."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_tokens(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Per-token (or static per-tensor) quantization of activations [M, K]: one Triton pass
    on CUDA, torch ops elsewhere. Returns codes and float32 scales [M, 1]."""
    if x.is_cuda:
        from pagedllm.quantization.fp8_kernels import quantize_fp8

        return quantize_fp8(x, static_scale)
    if static_scale is not None:
        return (quantize_static_reference(x, static_scale),
                static_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous())
    return quantize_tokens_reference(x)


def fast_accum_default(device: torch.device) -> bool:
    """Whether FP8 GEMMs accumulate in the tensor cores' own precision throughout (no
    periodic promotion to float32): on CUDA, as vLLM's Hopper FP8 kernels do (their
    `...FP8FastAccum` schedules); off with PAGEDLLM_FP8_FAST_ACCUM=0. The GPU tests hold its
    drift from the promoted product under a quarter of e4m3's own error
    (tests/gpu/test_quant_kernels.py)."""
    return device.type == "cuda" and os.environ.get(FAST_ACCUM_ENV, "1") != "0"


def scaled_mm_mode(device: torch.device, out_dtype: torch.dtype) -> str:
    """Which `_scaled_mm` form works here (see the module docstring); raises RuntimeError
    when none does."""
    a = torch.ones(16, 32, device=device).to(FP8_DTYPE)
    b = torch.ones(16, 32, device=device).to(FP8_DTYPE)
    sa = torch.ones(16, 1, device=device)
    sb = torch.ones(1, 16, device=device)
    errors = []
    for mode in SCALED_MM_MODES:
        try:
            y = _mm(mode, a, b, sa, sb, out_dtype)
            if float(y.float()[0, 0]) == 32.0:
                return mode
            errors.append(f"{mode}: wrong result")
        except (RuntimeError, NotImplementedError, TypeError) as e:
            errors.append(f"{mode}: {str(e).splitlines()[0]}")
    raise RuntimeError("torch._scaled_mm does not run FP8 here (torch "
                       f"{torch.__version__}): " + "; ".join(errors))


def _mm(mode: str, xq: torch.Tensor, wq: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
        out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """xq [M, K] e4m3 @ wq [N, K]^T with scales sx [M, 1] and sw [1, N] (float32).
    fast_accum: the tensor cores' own accumulator throughout (no periodic float32
    promotion), `_scaled_mm`'s use_fast_accum."""
    if mode == "rowwise":
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    if mode == "rowwise-bf16":
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum).to(out_dtype)
    one = torch.ones((), device=xq.device)
    y = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                         use_fast_accum=fast_accum)
    return (y * sx * sw).to(out_dtype)


class Fp8Weight(GatedGemvWeight):
    """y = x W^T for W = codes * scale[:, None] (e4m3 codes [N, K], float32 scales [N]); x
    is quantized to e4m3 per token, or with `input_scale` (a checkpoint's static scale)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 mode: str, input_scale: torch.Tensor | None = None,
                 fast_accum: bool = False) -> None:
        """fast_accum: `_scaled_mm`'s use_fast_accum (see `fast_accum_default`)."""
        super().__init__()
        if codes.dtype != FP8_DTYPE or codes.dim() != 2:
            raise ValueError(f"FP8 weight codes must be a 2-D {FP8_DTYPE} tensor, got "
                             f"{codes.dtype} {tuple(codes.shape)}.")
        if mode not in SCALED_MM_MODES:
            raise ValueError(f"Unknown scaled_mm mode {mode!r}; use one of {SCALED_MM_MODES}.")
        self.out_features, self.in_features = codes.shape
        self.dtype = dtype
        self.mode = mode
        self.fast_accum = fast_accum
        self.num_sms = sm_count(codes.device)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scale", scale.float().reshape(1, -1).contiguous(),
                             persistent=False)
        self.register_buffer("input_scale", None if input_scale is None else
                             input_scale.float().reshape(1).contiguous(), persistent=False)
        self._gemv_plans: GemvPlans | None = None  # made on the first GEMV

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def path(self, m: int, is_cuda: bool) -> str:
        """Which product serves M rows: ``gemv`` (the Triton weight-only skinny GEMM: CUDA,
        M <= GEMV_MAX_M) or ``scaled_mm`` (per-token quantization + _scaled_mm). A static
        input scale is not used by ``gemv`` (its activations are not quantized)."""
        return "gemv" if is_cuda and 0 < m <= GEMV_MAX_M else "scaled_mm"

    def takes_quantized(self, m: int) -> bool:
        """Whether M rows reach this weight's GEMM quantized per token, so that the kernel
        before it may hand them over as an `Fp8Activation` (not with a static input scale,
        nor on the GEMV path, whose activations stay in the model dtype)."""
        return self.input_scale is None and self.path(m, True) == "scaled_mm"

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if isinstance(x, Fp8Activation):
            lead = x.codes.shape[:-1]
            y = _mm(self.mode, x.codes.reshape(-1, self.in_features), self.codes,
                    x.scales.reshape(-1, 1), self.scale, self.dtype, self.fast_accum)
            return y.view(*lead, self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path(x2.shape[0], x2.is_cuda) == "gemv":
            y = self._gemv(x2, gated=False)
        else:
            xq, sx = quantize_tokens(x2, self.input_scale)
            y = _mm(self.mode, xq, self.codes, sx, self.scale, self.dtype, self.fast_accum)
        return y.view(*lead, self.out_features)

    def _gemv(self, x2: torch.Tensor, gated: bool) -> torch.Tensor:
        """The one-row GEMV with this weight's configuration and split scratch."""
        from pagedllm.quantization.fp8_gemv import fp8_gemv, fp8_gemv_config
        from pagedllm.quantization.gemv_split import GemvPlans

        if self._gemv_plans is None:
            self._gemv_plans = GemvPlans(self.out_features, lambda gated: fp8_gemv_config(
                1, self.out_features, self.in_features, self.num_sms, gated))
        cfg, scratch = self._gemv_plans.get(gated, x2.device)
        return fp8_gemv(x2, self.codes, self.scale, self.dtype, cfg, gated=gated,
                        scratch=scratch)

    def dequantized(self) -> torch.Tensor:
        """W as a dense float32 tensor (tests)."""
        return self.codes.float() * self.scale.reshape(-1, 1)

    def extra_repr(self) -> str:
        static = ", static input scale" if self.input_scale is not None else ""
        fast = ", fast accumulation" if self.fast_accum else ""
        return (f"e4m3, out={self.out_features}, in={self.in_features}, "
                f"{self.mode}{static}{fast}")
