"""4-bit weight-only (W4A16) linear layers from AWQ and GPTQ checkpoints.

Checkpoint layouts (per linear layer, W [N out, K in], G = K / group_size groups):

* AWQ (GEMM): ``qweight`` int32 [K, N / 8], 8 codes per int32 along the output dimension in
  the interleaved order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column ``AWQ_ORDER[i]``);
  ``qzeros`` int32 [G, N / 8] in the same order; ``scales`` fp16 [G, N];
  w = (q - z) * s.
* GPTQ: ``qweight`` int32 [K / 8, N], 8 codes per int32 along the input dimension (nibble j
  of row i is input 8 i + j); ``qzeros`` int32 [G, N / 8] sequential along N, stored as
  z - 1 in the v1 format (``checkpoint_format`` gptq; v2 stores z); ``scales`` fp16 [G, N];
  ``g_idx`` int32 [K], the group of each input (act-order: not k // group_size).

At load each piece becomes the canonical form (`unpack_awq` / `unpack_gptq`): codes uint8
[N, K], zeros uint8 [N, G], scales fp16 [N, G], g_idx [K]. `Int4Weight` packs that for the
Triton kernels (`int4_kernels`): codes int32 [K / 8, N] along K, scales fp16 [G, N], zeros
uint8 [G, N]; with act-order the inputs are sorted by group at load (each group then lies
in consecutive inputs) and the activations gathered in that order at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedllm.quantization.gated import GatedGemvWeight
from pagedllm.utils import sm_count

if TYPE_CHECKING:
    from pagedllm.quantization.gemv_split import GemvPlans

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Rows up to which CUDA runs the GEMV (int4_gemv): one, where an H200 measured it faster
# than the dequant-GEMM (benchmarks/RESULTS.md).
GEMV_MAX_M = 1
_AWQ_SHIFTS = tuple(4 * AWQ_ORDER.index(j) for j in range(8))  # column j -> its nibble


def _unpack_cols(packed: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """int32 [R, C] -> uint8 [R, 8 C]: column 8 c + j from bits shifts[j] of column c."""
    s = torch.tensor(shifts, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> s) & 0xF
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ qweight int32 [K, N / 8] -> codes uint8 [N, K]; qzeros [G, N / 8] -> zeros
    [N, G] (the same interleaved layout)."""
    return _unpack_cols(packed, _AWQ_SHIFTS).t().contiguous()


def unpack_gptq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight int32 [K / 8, N] -> codes uint8 [N, K]."""
    s = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    codes = (qweight.to(torch.int32).unsqueeze(1) >> s[None, :, None]) & 0xF  # [K/8, 8, N]
    return codes.reshape(-1, qweight.shape[1]).t().to(torch.uint8).contiguous()


def unpack_gptq_qzeros(qzeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """GPTQ qzeros int32 [G, N / 8] -> zeros uint8 [N, G] (v1: the stored z - 1, plus 1)."""
    zeros = _unpack_cols(qzeros, tuple(range(0, 32, 4))).to(torch.int32) + zero_offset
    return zeros.t().to(torch.uint8).contiguous()


def group_index(num_inputs: int, num_groups: int, g_idx: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """The group of every input (g_idx, or k // group_size)."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(num_inputs, device=device) // (num_inputs // num_groups)


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical int4 -> dense float32 W [N, K]: (q - z[g(k)]) * s[g(k)]."""
    g = group_index(codes.shape[1], zeros.shape[1], g_idx, codes.device)
    q = codes.to(torch.float32)
    return (q - zeros.to(torch.float32)[:, g]) * scales.to(torch.float32)[:, g]


def pack_kernel_layout(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> int32 [K / 8, N] (nibble j of row i: input 8 i + j)."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"4-bit layers need in_features divisible by 8, got {k}.")
    c = codes.t().reshape(k // 8, 8, n).to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)[None, :, None]
    return (c << shifts).sum(dim=1, dtype=torch.int32)


class Int4Weight(GatedGemvWeight):
    """y = x W^T for a 4-bit grouped W; x in `dtype` (fp16 / bf16). Triton kernels on CUDA
    (`path`: the GEMV of `int4_gemv` at decode batch 1, the dequant-GEMM of
    `int4_kernels` above); torch elsewhere (tests)."""

    def __init__(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = codes.shape
        num_groups = zeros.shape[1]
        if k % num_groups or zeros.shape != scales.shape or zeros.shape[0] != n:
            raise ValueError(f"4-bit layer shapes do not fit: codes {tuple(codes.shape)}, "
                             f"zeros {tuple(zeros.shape)}, scales {tuple(scales.shape)}.")
        self.out_features, self.in_features = n, k
        self.group_size = k // num_groups
        self.dtype = dtype
        self.num_sms = sm_count(codes.device)
        perm = None
        if g_idx is not None:
            g = g_idx.to(device=codes.device, dtype=torch.long)
            if not torch.equal(g, torch.arange(k, device=codes.device) // self.group_size):
                perm = torch.argsort(g, stable=True)
                if not torch.equal(g[perm], torch.arange(k, device=codes.device)
                                   // self.group_size):
                    raise ValueError("g_idx does not give every group group_size inputs; "
                                     "this GPTQ checkpoint's act-order layout is not "
                                     "supported.")
                codes = codes[:, perm]
        self.register_buffer("qweight", pack_kernel_layout(codes), persistent=False)
        self.register_buffer("scales", scales.t().to(torch.float16).contiguous(),
                             persistent=False)
        self.register_buffer("zeros", zeros.t().to(torch.uint8).contiguous(), persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self._gemv_plans: GemvPlans | None = None  # made on the first GEMV

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self.kernel_input(x.reshape(-1, self.in_features))
        path = self.path(x2.shape[0], x2.is_cuda)
        if path == "gemv":
            y = self._gemv(x2, gated=False)
        elif path == "gemm":
            from pagedllm.quantization.int4_kernels import int4_matmul

            y = int4_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size)
        else:
            y = (x2.float() @ self.dequantized_sorted().t()).to(x.dtype)
        return y.view(*lead, self.out_features)

    def kernel_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x [M, K] with its inputs in the kernels' (group-sorted, act-order) order."""
        return x2 if self.perm is None else x2.index_select(1, self.perm)

    def _gemv(self, x2: torch.Tensor, gated: bool) -> torch.Tensor:
        """The one-row GEMV with this weight's configuration and split scratch."""
        from pagedllm.quantization.gemv_split import GemvPlans
        from pagedllm.quantization.int4_gemv import int4_gemv, int4_gemv_config

        if self._gemv_plans is None:
            self._gemv_plans = GemvPlans(self.out_features, lambda gated: int4_gemv_config(
                1, self.out_features, self.in_features, self.group_size, self.num_sms, gated))
        cfg, scratch = self._gemv_plans.get(gated, x2.device)
        return int4_gemv(x2, self.qweight, self.scales, self.zeros, self.group_size, cfg,
                         gated=gated, scratch=scratch)

    def path(self, m: int, is_cuda: bool) -> str:
        """Which product serves M rows: ``gemv`` (CUDA, M <= GEMV_MAX_M), ``gemm`` (CUDA,
        more rows) or ``torch`` (dequantize, then matmul)."""
        if not is_cuda:
            return "torch"
        return "gemv" if 0 < m <= GEMV_MAX_M else "gemm"

    def dequantized_sorted(self) -> torch.Tensor:
        """Dense float32 W [N, K] with its inputs in the kernel's (group-sorted) order."""
        s = torch.arange(0, 32, 4, dtype=torch.int32, device=self.qweight.device)
        codes = ((self.qweight.unsqueeze(1) >> s[None, :, None]) & 0xF).reshape(
            self.in_features, self.out_features)  # [K, N]
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        w = (codes.float() - self.zeros.float()[g]) * self.scales.float()[g]
        return w.t()

    def dequantized(self) -> torch.Tensor:
        """Dense float32 W [N, K] in the checkpoint's input order (tests)."""
        w = self.dequantized_sorted()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def extra_repr(self) -> str:
        act = ", act-order" if self.perm is not None else ""
        return f"int4, out={self.out_features}, in={self.in_features}, " \
               f"group {self.group_size}{act}, {self.dtype}"
