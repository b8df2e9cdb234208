"""TORCH_SDPA: the reference attention backend in plain torch; runs on CPU and CUDA.

Decodes of a batch are gathered from their blocks and attended together in one SDPA call;
prefill chunks (with or without a cached prefix) are attended one request at a
time with SDPA. A decode-only step in bf16 on the CPU goes to one fused C call per layer
instead (`pagedllm.cpu_kernels`: cache write and attention over the blocks in place).
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from pagedllm.attention.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
)
from pagedllm.cpu_kernels import ops as cpu_ops


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, has_padding: bool | None = None) -> None:
    """Scatter key/value rows into the paged cache at their slots (-1 = padding, skipped;
    `has_padding` None: look)."""
    n = slot_mapping.shape[0]
    if key.shape[0] != n:
        key, value = key[:n], value[:n]
    if has_padding is None:
        has_padding = bool(n) and bool((slot_mapping < 0).any())
    if has_padding:
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    num_kv_heads, head_size = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, value)


def _causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device
                 ) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         scale: float, cap: float) -> torch.Tensor:
    """Attention with tanh-capped scores (Gemma 2): q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D],
    mask broadcastable to [B, Hq, Lq, Lk] (True = attend). Softmax in float32."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class TorchSDPAImpl(AttentionImpl):
    name = "TORCH_SDPA"
    supports_logits_soft_cap = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        if metadata.is_decode_only and query.shape[0] == metadata.num_reqs:
            fused = self._fused_decode(query, kv_cache, metadata)
            if fused is not None:  # bf16 on the CPU: write and attend in one C call
                kernels, step = fused
                return kernels.paged_decode(query, key, value, kv_cache, step, self.scale,
                                            self.sliding_window)
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping,
                       _has_padding(metadata))
        qsl, seq_lens = _step_lists(metadata)
        if metadata.is_decode_only and query.shape[0] == metadata.num_reqs:
            return self._decode(query, kv_cache, metadata, list(range(metadata.num_reqs)),
                                qsl, seq_lens, None)
        out = torch.zeros_like(query)
        q_lens = [qsl[i + 1] - qsl[i] for i in range(metadata.num_reqs)]
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        if decodes:
            self._decode(query, kv_cache, metadata, decodes, qsl, seq_lens, out)
        block_size = kv_cache.shape[2]
        for i in range(metadata.num_reqs):
            if q_lens[i] <= 1:
                continue
            start, end, kv_len = qsl[i], qsl[i + 1], seq_lens[i]
            num_blocks = -(-kv_len // block_size)
            blocks = metadata.block_table[i, :num_blocks].long()
            k = kv_cache[0, blocks].flatten(0, 1)[:kv_len]  # [kv_len, Hkv, D]
            v = kv_cache[1, blocks].flatten(0, 1)[:kv_len]
            out[start:end] = self._attend(query[start:end], k, v)
        return out

    @cached_property
    def fused_decode_supported(self) -> bool:
        """Whether this layer's heads suit the fused CPU decode kernel."""
        return (self.logits_soft_cap is None
                and cpu_ops.decode_supported(self.num_heads, self.num_kv_heads, self.head_size))

    def _fused_decode(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata
                      ) -> tuple[cpu_ops.CpuKernels, cpu_ops.DecodeStep] | None:
        """The fused CPU kernels and this step's checked inputs to them, where a decode-only
        step of this layer can take them: bf16 query and cache on the CPU, no softcap."""
        if (query.dtype is not torch.bfloat16 or kv_cache.dtype is not torch.bfloat16
                or kv_cache.device.type != "cpu" or not self.fused_decode_supported):
            return None
        kernels = cpu_ops.get()
        if kernels is None or not kernels.fused_attention:
            return None
        return kernels, cpu_ops.DecodeStep.of_step(md, kv_cache)

    def _grouped(self, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, bool]]:
        """K/V heads (dim 1) for grouped-query attention: SDPA's enable_gqa where torch has
        it, else each KV head repeated for its group of query heads."""
        group = self.num_heads // self.num_kv_heads
        if group == 1:
            return k, v, {}
        if _SDPA_HAS_GQA:
            return k, v, {"enable_gqa": True}
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), {}

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [n, Hq, D] (the last n positions) over k/v [L, Hkv, D]."""
        q_len, kv_len = q.shape[0], k.shape[0]
        if self.logits_soft_cap is not None:
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            mask = _causal_mask(q_len, kv_len, self.sliding_window, q.device)
            o = softcapped_attention(q, k, v, mask, self.scale, self.logits_soft_cap)
            return o[0].transpose(0, 1)
        k, v, kwargs = self._grouped(k, v)
        # 4-D contiguous [1, heads, len, dim] inputs take SDPA's fast fused CPU kernel.
        q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        if q_len == kv_len and self.sliding_window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               **kwargs)
        else:
            mask = _causal_mask(q_len, kv_len, self.sliding_window, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               **kwargs)
        return o[0].transpose(0, 1)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                rows: list[int], qsl: list[int], seq_lens: list[int],
                out: torch.Tensor | None) -> torch.Tensor:
        """Attend all single-token queries at once over their gathered contexts (rows
        `rows` of the batch); into `out`, or returned when the batch is all decodes.

        K/V blocks are gathered with one index_select each (a fast whole-block copy on the
        CPU) and attended with SDPA on strided [R, Hkv, L, D] views, no copies: one row is
        sliced to its exact context, several rows share an additive padding (and window)
        mask. On the CPU several times faster than a float32 matmul pair over contiguous
        copies. Tanh-capped scores (Gemma 2) take the matmul path (`_decode_softcapped`)."""
        key = ("torch_sdpa_decode", self.sliding_window)
        plan = md.backend_cache.get(key)
        if plan is None:  # once per step: every layer shares it
            plan = _DecodePlan(md, rows, qsl, seq_lens, kv_cache.shape[2], self.sliding_window,
                               kv_cache.dtype)
            md.backend_cache[key] = plan
        r, hkv = len(rows), self.num_kv_heads
        k = kv_cache[0].index_select(0, plan.blocks).view(r, plan.length, hkv, -1)
        v = kv_cache[1].index_select(0, plan.blocks).view(r, plan.length, hkv, -1)
        q = query if out is None else query.index_select(0, plan.tokens)
        if self.logits_soft_cap is not None:
            o = self._decode_softcapped(q, k, v, plan)
        else:
            if plan.span is not None:
                k, v = k[:, plan.span[0]:plan.span[1]], v[:, plan.span[0]:plan.span[1]]
            k, v, kwargs = self._grouped(k.transpose(1, 2), v.transpose(1, 2))
            o = F.scaled_dot_product_attention(
                q.to(k.dtype).unsqueeze(2), k, v, attn_mask=plan.mask, scale=self.scale,
                **kwargs).squeeze(2)  # [R, Hq, D]
        if out is None:
            return o
        out[plan.tokens] = o.to(out.dtype)
        return out

    def _decode_softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           plan: _DecodePlan) -> torch.Tensor:
        """Decode attention with tanh-capped scores: q [R, Hq, D], k / v gathered
        [R, L, Hkv, D]. float32 matmuls (at these shapes faster than bf16 ones on the CPU)
        with scores and probabilities rounded where matmuls in the cache dtype round;
        softmax in float32."""
        r, hkv = q.shape[0], self.num_kv_heads
        group = self.num_heads // hkv
        dtype = k.dtype
        k = k.permute(0, 2, 3, 1).to(torch.float32, memory_format=torch.contiguous_format)
        v = v.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        scores = _round_to(torch.matmul(q.view(r, hkv, group, -1).float(), k), dtype)
        cap = self.logits_soft_cap
        scores = torch.tanh(scores.mul_(self.scale / cap)).mul_(cap)
        probs = _round_to(torch.softmax(scores.add_(plan.bias), dim=-1), dtype)
        return torch.matmul(probs, v).view(r, self.num_heads, -1).to(dtype)


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `x` rounded to `dtype` (as a matmul in that dtype rounds), kept float32."""
    return x if dtype == torch.float32 else x.to(dtype).float()


def _step_lists(md: AttentionMetadata) -> tuple[list[int], list[int]]:
    """The step's query start offsets and sequence lengths as lists; read once per step."""
    lists = md.backend_cache.get("torch_sdpa_lists")
    if lists is None:
        lists = (md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist())
        md.backend_cache["torch_sdpa_lists"] = lists
    return lists


def _has_padding(md: AttentionMetadata) -> bool:
    """Whether the step's slot mapping has padding (-1) rows; checked once per step."""
    flag = md.backend_cache.get("torch_sdpa_padding")
    if flag is None:
        slots = md.slot_mapping
        flag = bool(slots.shape[0]) and bool((slots < 0).any())
        md.backend_cache["torch_sdpa_padding"] = flag
    return flag


class _DecodePlan:
    """What the decode path of every layer needs from one step's metadata: the requests'
    blocks (flattened), their query tokens, and which gathered positions each row attends:
    `span` (start, end) for a single row, else `mask` (additive, in the cache dtype,
    [R, 1, 1, L]); `bias` is the float32 form of the same mask (the softcapped path)."""

    def __init__(self, md: AttentionMetadata, rows: list[int], qsl: list[int],
                 seq_lens: list[int], block_size: int, sliding_window: int | None,
                 dtype: torch.dtype) -> None:
        device = md.block_table.device
        row_lens = [seq_lens[i] for i in rows]
        num_blocks = -(-max(row_lens) // block_size)
        if len(rows) == 1:
            self.blocks = md.block_table[rows[0], :num_blocks].long()
        else:
            row_idx = torch.tensor(rows, device=device)
            self.blocks = md.block_table[row_idx, :num_blocks].reshape(-1).long()
        self.length = num_blocks * block_size
        self.tokens = torch.tensor([qsl[i] for i in rows], device=device)
        self._lens = row_lens
        self._sliding_window = sliding_window
        self.span: tuple[int, int] | None = None
        self.mask: torch.Tensor | None = None
        if len(rows) == 1:
            end = row_lens[0]
            start = 0 if sliding_window is None else max(0, end - sliding_window)
            self.span = (start, end)
        else:
            self.mask = self.bias.to(dtype)

    @cached_property
    def bias(self) -> torch.Tensor:
        """Additive float32 mask [R, 1, 1, L]: 0 where a row attends, -inf elsewhere."""
        device = self.blocks.device
        lens = torch.tensor(self._lens, device=device).unsqueeze(1)
        pos = torch.arange(self.length, device=device).unsqueeze(0)
        valid = pos < lens
        if self._sliding_window is not None:
            valid &= pos > (lens - 1 - self._sliding_window)
        return torch.zeros(valid.shape, device=device).masked_fill_(
            ~valid, float("-inf"))[:, None, None, :]


class TorchSDPABackend(AttentionBackend):
    name = "TORCH_SDPA"

    @staticmethod
    def is_available(device: str) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TorchSDPAImpl

    @staticmethod
    def implementation() -> str:
        return "torch scaled_dot_product_attention"
