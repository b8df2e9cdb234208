"""FLASH_ATTN: FlashAttention kernels over the paged KV cache (CUDA, fp16/bf16).

One kernel call per layer attends the whole mixed batch: varlen queries (prefill chunks,
with or without a cached prefix, and decodes) with GQA and sliding windows. Our Triton
``reshape_and_cache`` writes the new K/V first.

Implementations, preferred first:
- FA2 from the ``flash_attn`` package, reading K/V through the block table;
- PyTorch's bundled FlashAttention (``aten::_flash_attention_forward``) where it takes
  ``seqused_k`` and ``block_table`` (FA2, or FA3 where the user activated it with
  ``torch.nn.attention.activate_flash_attention_impl``). Both need blocks of 256 tokens;
- PyTorch's bundled FlashAttention where it takes no block table (torch 2.11): each layer
  gathers the step's contexts from the paged cache into one varlen K/V buffer first. Any
  block size works; decode steps run eagerly (the gather's size changes every step).
At start-up each candidate runs a small mixed paged batch against a torch reference (and,
paged ones, inside a CUDA graph); the first that passes is used.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedllm.attention.backends.abstract import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
)

logger = logging.getLogger(__name__)

# FA2's paged kernels need a KV block size divisible by 256.
BLOCK_SIZE = 256
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_SIZE = 256

# (q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, seqused_k, max_q, max_k, scale,
#  (window_left, window_right), block_table) -> out
PagedFn = Callable[..., torch.Tensor]


def cu_seqlens(seq_lens: torch.Tensor) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as int32 (on the device of seq_lens; graph capturable)."""
    out = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
    torch.cumsum(seq_lens, 0, out=out[1:])
    return out


def window_sizes(sliding_window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right): a query at p sees keys p - left .. p + right."""
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


def _step_value(md: AttentionMetadata, name: str, make: Callable[[], object]) -> object:
    """A value derived once per step and shared by every layer; made afresh inside a graph
    capture (the warm-up runs before it leave eager ones behind, which a replay would not
    update)."""
    key = ("flash_attn", name, torch.cuda.is_current_stream_capturing())
    value = md.backend_cache.get(key)
    if value is None:
        value = md.backend_cache[key] = make()
    return value


@dataclass(frozen=True)
class PagedKernel:
    """A kernel that reads K/V through the block table (graph capturable decode)."""

    label: str  # what the start-up log names
    fn: PagedFn
    paged: bool = True
    cuda_graphs: bool = False  # set by the probe: its graph replay matched the eager call

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
               scale: float, window: tuple[int, int]) -> torch.Tensor:
        cu_k = _step_value(md, "cu_k", lambda: cu_seqlens(md.seq_lens))
        # An upper bound of every request's KV length that depends only on shapes, so that
        # a captured decode graph stays right for any context its table can hold.
        max_k = md.block_table.shape[1] * kv_cache.shape[2]
        return self.fn(query, kv_cache[0], kv_cache[1], md.query_start_loc, cu_k, md.seq_lens,
                       max(md.max_query_len, 1), max_k, scale, window, md.block_table)


@dataclass(frozen=True)
class GatheredKernel:
    """PyTorch's varlen FlashAttention over K/V gathered from the blocks once per layer.

    by_blocks: copy each request's whole blocks (large contiguous rows) and point the kernel
    at them with block-aligned cu_seqlens_k and the true lengths in seqused_k; otherwise
    copy exactly the context tokens (for a torch whose kernel ignores seqused_k).
    """

    label: str
    by_blocks: bool = True
    paged: bool = False
    cuda_graphs: bool = False  # the gather's size changes every step

    def _plan(self, md: AttentionMetadata, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What to gather (block or slot ids), cu_seqlens_k of the gathered rows, and
        seqused_k (None when the rows are exactly the contexts)."""
        n = md.num_reqs
        seq_lens, dev = md.seq_lens[:n], md.seq_lens.device
        req_ids = torch.arange(n, device=dev)
        if self.by_blocks:
            nblocks = (seq_lens + block_size - 1) // block_size
            total = int(((md.seq_lens_cpu[:n] + block_size - 1) // block_size).sum())
            cu_blocks = cu_seqlens(nblocks)
            req = torch.repeat_interleave(req_ids, nblocks, output_size=total)
            idx = torch.arange(total, device=dev) - cu_blocks[req]
            return md.block_table[req, idx].long(), cu_blocks * block_size, seq_lens
        total = int(md.seq_lens_cpu[:n].sum())
        cu_k = cu_seqlens(seq_lens)
        req = torch.repeat_interleave(req_ids, seq_lens, output_size=total)
        pos = torch.arange(total, device=dev) - cu_k[req]
        blocks = md.block_table[req, pos // block_size].long()
        return blocks * block_size + pos % block_size, cu_k, None

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
               scale: float, window: tuple[int, int]) -> torch.Tensor:
        index, cu_k, seqused_k = _step_value(
            md, f"gather{int(self.by_blocks)}", lambda: self._plan(md, kv_cache.shape[2]))
        if self.by_blocks:  # [blocks, block_size, H, D] rows, flattened to tokens
            k = kv_cache[0].index_select(0, index).flatten(0, 1)
            v = kv_cache[1].index_select(0, index).flatten(0, 1)
        else:
            heads, dim = kv_cache.shape[3], kv_cache.shape[4]
            k = kv_cache[0].view(-1, heads, dim).index_select(0, index)
            v = kv_cache[1].view(-1, heads, dim).index_select(0, index)
        return torch.ops.aten._flash_attention_forward(
            query, k, v, md.query_start_loc, cu_k, max(md.max_query_len, 1),
            max(md.max_seq_len, 1), 0.0, True, False, scale=scale, window_size_left=window[0],
            window_size_right=window[1], seqused_k=seqused_k)[0]


FlashKernel = PagedKernel | GatheredKernel


def _torch_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cu_q: torch.Tensor, cu_k: torch.Tensor, seqused_k: torch.Tensor,
                  max_q: int, max_k: int, scale: float, window: tuple[int, int],
                  block_table: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._flash_attention_forward(
        q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale,
        window_size_left=window[0], window_size_right=window[1], seqused_k=seqused_k,
        block_table=block_table)[0]


def _package_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_q: torch.Tensor, cu_k: torch.Tensor, seqused_k: torch.Tensor,
                    max_q: int, max_k: int, scale: float, window: tuple[int, int],
                    block_table: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    # The package takes each request's KV length from cu_seqlens_k (no seqused_k).
    return flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k,
                                  softmax_scale=scale, causal=True, window_size=window,
                                  block_table=block_table)


def _torch_flash_args() -> set[str]:
    """Argument names of this torch's aten::_flash_attention_forward (empty: none)."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    try:
        return {a.name for a in op.default._schema.arguments} if op is not None else set()
    except (AttributeError, RuntimeError):
        return set()


def _package_version() -> str | None:
    """The flash_attn package's version when it has the paged varlen entry point."""
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    import inspect

    if "block_table" not in inspect.signature(flash_attn_varlen_func).parameters:
        return None
    return getattr(flash_attn, "__version__", "?")


def _torch_impl_name() -> str:
    """FA2 (PyTorch's own build) or the implementation activated in torch's registry."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    name = current() if current is not None else None
    return str(name) if name else "FA2"


def candidates() -> list[FlashKernel]:
    """The implementations present here, preferred first (none probed yet)."""
    found: list[FlashKernel] = []
    version = _package_version()
    if version is not None:
        found.append(PagedKernel(f"FA2, flash_attn package {version}", _package_kernel))
    args = _torch_flash_args()
    bundled = f"{_torch_impl_name()}, bundled with PyTorch {torch.__version__}"
    if {"seqused_k", "block_table"} <= args:
        found.append(PagedKernel(bundled, _torch_kernel))
    if args:
        gathered = f"{bundled}; its kernel takes no block table, so each layer first " \
                   "gathers the step's K/V"
        if "seqused_k" in args:
            found.append(GatheredKernel(f"{gathered} block by block"))
        found.append(GatheredKernel(f"{gathered} token by token", by_blocks=False))
    return found


def paged_block_size() -> bool:
    """True when a paged kernel is present: FLASH_ATTN then uses blocks of 256 tokens."""
    return any(k.paged for k in candidates())


def _probe_reference(q: torch.Tensor, kv_cache: torch.Tensor, table: torch.Tensor,
                     q_lens: list[int], seq_lens: list[int], scale: float) -> torch.Tensor:
    """Causal attention per request over its gathered blocks, in fp32."""
    outs = []
    start = 0
    group = q.shape[1] // kv_cache.shape[3]
    for i, (ql, sl) in enumerate(zip(q_lens, seq_lens, strict=True)):
        blocks = table[i, :math.ceil(sl / kv_cache.shape[2])].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:sl].float().repeat_interleave(group, 1)
        v = kv_cache[1, blocks].flatten(0, 1)[:sl].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + ql].float(), k) * scale
        qpos = torch.arange(sl - ql, sl, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(sl, device=q.device)[None, :] > qpos,
                                    float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += ql
    return torch.cat(outs)


def _probe(kernel: FlashKernel, device: torch.device) -> bool:
    """Run a small mixed paged batch (GQA, a prefix hit, a decode, a fresh prefill)
    eagerly; raise when it fails or is wrong. Returns whether a CUDA-graph replay of a paged
    kernel gives the same output (False for gathered ones, which are not captured)."""
    gen = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d, bs = 4, 2, 64, BLOCK_SIZE if kernel.paged else 16
    q_lens, seq_lens = [3, 1, 7], [bs + 44, 5, 7]
    need = [math.ceil(sl / bs) for sl in seq_lens]
    kv_cache = torch.randn(2, sum(need) + 1, bs, hkv, d, device=device, generator=gen,
                           dtype=torch.bfloat16)
    ids = torch.randperm(sum(need) + 1, device=device, generator=gen).to(torch.int32)
    table = torch.zeros(3, max(need), dtype=torch.int32, device=device)
    for i, start in enumerate([0, need[0], need[0] + need[1]]):
        table[i, :need[i]] = ids[start:start + need[i]]
    q = torch.randn(sum(q_lens), hq, d, device=device, generator=gen, dtype=torch.bfloat16)
    qsl = cu_seqlens(torch.tensor(q_lens, dtype=torch.int32))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=sum(q_lens), num_reqs=3, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), query_start_loc=qsl.to(device), seq_lens=lens.to(device),
        block_table=table, slot_mapping=torch.empty(0, dtype=torch.long, device=device),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    scale = d**-0.5
    out = kernel.attend(q, kv_cache, md, scale, (-1, -1))
    ref = _probe_reference(q, kv_cache, table, q_lens, seq_lens, scale)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise RuntimeError(f"wrong result (relative error {err:.2e})")
    if not kernel.paged:
        return False
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = kernel.attend(q, kv_cache, md, scale, (-1, -1))
        graph.replay()
        torch.cuda.synchronize(device)
        return torch.equal(replayed, out)
    except RuntimeError as exc:
        logger.warning("FLASH_ATTN kernel does not capture in a CUDA graph (%s)", exc)
        return False


@functools.cache
def select_kernel(device_index: int) -> FlashKernel:
    """The first FlashAttention implementation that passes the probe on this GPU (once per
    process and device), with whether it replays in CUDA graphs. Raises ValueError naming
    each failure."""
    device = torch.device("cuda", device_index)
    failures = []
    for kernel in candidates():
        try:
            with torch.cuda.device(device), torch.inference_mode():
                graphs = _probe(kernel, device)
        except (RuntimeError, TypeError) as exc:
            failures.append(f"{kernel.label}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]}")
            continue
        return dataclasses.replace(kernel, cuda_graphs=graphs)
    raise ValueError(
        "FLASH_ATTN: no FlashAttention kernel works here ("
        + ("; ".join(failures) or "this torch has no _flash_attention_forward and the "
           "flash_attn package is not installed")
        + "); use --attention-backend TRITON_ATTN.")


class FlashAttentionImpl(AttentionImpl):
    """Writes K/V into the paged cache, then one FlashAttention call for the whole batch."""

    name = "FLASH_ATTN"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Attend causally over the paged cache; returns ``[T, Hq, D]`` in query dtype.

        Rows past ``metadata.num_actual_tokens`` are left unwritten (they may hold anything).
        """
        from pagedllm.attention.ops.triton_reshape_and_cache import reshape_and_cache

        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_size)
        key = key.view(-1, self.num_kv_heads, self.head_size)
        value = value.view(-1, self.num_kv_heads, self.head_size)
        num_actual = min(metadata.num_actual_tokens, num_tokens)
        if num_actual == 0:
            return torch.empty_like(query)
        reshape_and_cache(key, value, kv_cache,
                          metadata.slot_mapping[: min(num_actual, metadata.slot_mapping.shape[0])])
        kernel = select_kernel(query.device.index)
        return kernel.attend(query, kv_cache, metadata, self.scale,
                             window_sizes(self.sliding_window))


class FlashAttentionBackend(AttentionBackend):
    """FlashAttention (the flash_attn package, or PyTorch's bundled kernels) on CUDA."""

    name = "FLASH_ATTN"

    @staticmethod
    def is_available(device: str) -> bool:
        """True on a CUDA device with the flash_attn package or torch's FlashAttention."""
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            return False
        return bool(candidates())

    @staticmethod
    def unavailable_reason(device: str) -> str:
        if not str(device).startswith("cuda"):
            return (f"FLASH_ATTN runs FlashAttention's CUDA kernels and cannot run on "
                    f"{device}; use attention_backend='TORCH_SDPA' there.")
        if not torch.cuda.is_available():
            return "FLASH_ATTN needs a CUDA GPU; use attention_backend='TORCH_SDPA'."
        return (f"FLASH_ATTN needs the flash_attn package or a torch with FlashAttention "
                f"(this is {torch.__version__}); use attention_backend='TRITON_ATTN'.")

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return FlashAttentionImpl

    @staticmethod
    def supports_cuda_graphs() -> bool:
        return select_kernel(torch.cuda.current_device()).cuda_graphs

    @staticmethod
    def implementation() -> str:
        kernel = select_kernel(torch.cuda.current_device())
        return kernel.label + ("" if kernel.cuda_graphs else "; decode runs without CUDA graphs")

    @staticmethod
    def scratch_layers() -> int:
        """A gathering kernel holds one layer's gathered K/V at a time: at worst a whole
        layer of the cache (budgeted like one more layer)."""
        return 0 if select_kernel(torch.cuda.current_device()).paged else 1

    @classmethod
    def resolve_block_size(cls, block_size: int | None) -> int:
        if not paged_block_size():  # K/V gathered: any block size works
            return super().resolve_block_size(block_size)
        if block_size is None:
            return BLOCK_SIZE
        if block_size % BLOCK_SIZE:
            raise ValueError(
                f"block_size={block_size} is not supported by FLASH_ATTN: FlashAttention's "
                f"paged kernels need a multiple of {BLOCK_SIZE}. Leave block_size unset "
                f"(FLASH_ATTN then uses {BLOCK_SIZE}), pass --block-size {BLOCK_SIZE}, or use "
                "--attention-backend TRITON_ATTN.")
        return block_size

    @classmethod
    def check_model(cls, dtype: torch.dtype, head_size: int) -> None:
        if dtype not in DTYPES:
            raise ValueError(
                f"FLASH_ATTN runs in float16 or bfloat16, not {str(dtype).removeprefix('torch.')};"
                " pass dtype='bfloat16' (or 'float16'), or use --attention-backend TRITON_ATTN.")
        if head_size % 8 or head_size > MAX_HEAD_SIZE:
            raise ValueError(
                f"FLASH_ATTN supports head sizes that are multiples of 8 up to {MAX_HEAD_SIZE}; "
                f"this model's is {head_size}. Use --attention-backend TRITON_ATTN.")
