"""TORCH_SDPA: the reference attention backend in plain torch; runs on CPU and CUDA.

Decodes of a batch are gathered from their blocks and attended together; prefill chunks
(with or without a cached prefix) are attended one request at a time with SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter key/value rows into the paged cache at their slots (-1 = padding, skipped)."""
    n = slot_mapping.shape[0]
    key, value = key[:n], value[:n]
    if n and bool((slot_mapping < 0).any()):
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
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        out = torch.zeros_like(query)
        qsl = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        q_lens = [qsl[i + 1] - qsl[i] for i in range(metadata.num_reqs)]
        decodes = [i for i, n in enumerate(q_lens) if n == 1]
        if len(decodes) > 1:
            self._decode(query, kv_cache, metadata, decodes, qsl, seq_lens, out)
            decodes_done = set(decodes)
        else:
            decodes_done = set()
        block_size = kv_cache.shape[2]
        for i in range(metadata.num_reqs):
            if i in decodes_done or q_lens[i] == 0:
                continue
            start, end, kv_len = qsl[i], qsl[i + 1], seq_lens[i]
            num_blocks = -(-kv_len // block_size)
            blocks = metadata.block_table[i, :num_blocks].long()
            k = kv_cache[0, blocks].flatten(0, 1)[:kv_len]  # [kv_len, Hkv, D]
            v = kv_cache[1, blocks].flatten(0, 1)[:kv_len]
            out[start:end] = self._attend(query[start:end], k, v)
        return out

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
                rows: list[int], qsl: list[int], seq_lens: list[int], out: torch.Tensor) -> None:
        """Attend all single-token queries at once over their gathered, padded contexts."""
        plan = md.backend_cache.get(("torch_sdpa_decode", self.sliding_window))
        if plan is None:  # once per step: every layer shares it
            plan = _DecodePlan(md, rows, qsl, seq_lens, kv_cache.shape[2], self.sliding_window)
            md.backend_cache[("torch_sdpa_decode", self.sliding_window)] = plan
        r, length = len(rows), plan.length
        # index_select copies whole blocks (a fast path on CPU), unlike advanced indexing.
        k = kv_cache[0].index_select(0, plan.blocks).view(r, length, self.num_kv_heads, -1)
        v = kv_cache[1].index_select(0, plan.blocks).view(r, length, self.num_kv_heads, -1)
        q = query.index_select(0, plan.tokens)  # [R, Hq, D]
        if self.logits_soft_cap is not None:
            o = softcapped_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                     plan.mask, self.scale, self.logits_soft_cap)
            out[plan.tokens] = o.reshape(r, self.num_heads, -1).to(out.dtype)
            return
        # [R, heads, len, dim] views; SDPA's fused kernel handles the padding mask.
        k, v, kwargs = self._grouped(k.transpose(1, 2), v.transpose(1, 2))
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=plan.mask,
                                           scale=self.scale, **kwargs)
        out[plan.tokens] = o.reshape(r, self.num_heads, -1).to(out.dtype)


class _DecodePlan:
    """What the decode path of every layer needs from one step's metadata: the requests'
    blocks (flattened), their query tokens and the padding (and sliding-window) mask."""

    def __init__(self, md: AttentionMetadata, rows: list[int], qsl: list[int],
                 seq_lens: list[int], block_size: int, sliding_window: int | None) -> None:
        device = md.block_table.device
        lens = torch.tensor([seq_lens[i] for i in rows], device=device)
        num_blocks = -(-max(seq_lens[i] for i in rows) // block_size)
        row_idx = torch.tensor(rows, device=device)
        self.blocks = md.block_table[row_idx, :num_blocks].reshape(-1).long()
        self.length = num_blocks * block_size
        self.tokens = torch.tensor([qsl[i] for i in rows], device=device)
        pos = torch.arange(self.length, device=device)
        valid = pos.unsqueeze(0) < lens.unsqueeze(1)
        if sliding_window is not None:
            valid &= pos.unsqueeze(0) > (lens.unsqueeze(1) - 1 - sliding_window)
        self.mask = valid[:, None, None, :]


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
