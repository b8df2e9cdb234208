"""Fused MoE on CUDA: tokens sorted by expert, then two grouped GEMMs in Triton.

1. `align_tokens`: the T*k (token, expert) pairs sorted by expert, each expert's run padded
   to a multiple of BLOCK_M, and the expert of every BLOCK_M block. No host sync, so it runs
   inside captured CUDA graphs: for decode-sized batches (<= 64 pairs) one single-program
   Triton kernel, else three launches (per-chunk histograms; the runs' starts and each
   chunk's offsets; the placement), whatever the count: an eager prefill step of a MoE
   model is launch-bound, and sorting with torch ops took some 45 launches per layer.
2. `_moe_gemm_kernel`, gated: inter[p] = silu(x[tok] W1[e]^T) * (x[tok] W3[e]^T) for every
   pair p; the gate and up tiles are accumulated in the same program and SiLU-mul is its
   epilogue, so the [T*k, 2I] gate-up product never reaches memory.
3. The same kernel, plain: y[p] = weight[p] * inter[p] W2[e]^T; then the k rows of each
   token are summed (`sum_expert_rows`, one launch).

One token (decode at batch 1) takes `moe_gemv` instead (up to GEMV_MAX_TOKENS): two GEMV
launches that read each chosen expert's rows directly, with no alignment, no padded blocks
and the top-k sum inside the down kernel.

Each program owns one BLOCK_M x BLOCK_N output tile of one expert and streams that expert's
weight tile along K; blocks past the padded total exit at once. Block sizes come from
`_config` by the number of pairs: small (decode) batches take BLOCK_M=16 tiles with narrow
N so that each expert's weights are read once by many programs; large batches take
64/128-row tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.pdl import launch_options, pdl_enabled, pdl_trigger, pdl_wait


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr,
    N, K, num_pairs, max_padded,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """c[p, :N] for the pairs p of one block. A rows are pair // A_ROW_DIV (the token, for
    the first GEMM; the pair itself for the second). B is [E, N(*2 if GATED), K]."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share the weight tiles they load while resident.
    group_size = GROUP_M * num_pid_n
    group = pid // group_size
    first_m = group * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    total = tl.load(total_ptr)
    if pid_m * BLOCK_M >= total:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    pair_mask = pair < num_pairs
    a_row = pair // A_ROW_DIV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :] * stride_bn
              + offs_k[:, None] * stride_bk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :],
                           other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pair, mask=pair_mask, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr,
                        num_pairs, num_experts, max_padded,
                        BLOCK_M: tl.constexpr, P_PAD: tl.constexpr, E_PAD: tl.constexpr,
                        S_PAD: tl.constexpr, NB_PAD: tl.constexpr):
    """align_tokens for few pairs in one program (one launch instead of a dozen torch ops:
    the decode path). Counts, ranks and offsets come from comparison matrices."""
    offs_p = tl.arange(0, P_PAD)
    offs_e = tl.arange(0, E_PAD)
    p_mask = offs_p < num_pairs
    ids = tl.load(ids_ptr + offs_p, mask=p_mask, other=-1).to(tl.int32)
    hit = (ids[None, :] == offs_e[:, None]).to(tl.int32)  # [E, P]
    counts = tl.sum(hit, axis=1)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    before = (ids[:, None] == ids[None, :]) & (offs_p[None, :] < offs_p[:, None])  # [P, P]
    rank = tl.sum(before.to(tl.int32), axis=1)
    own = (ids[:, None] == offs_e[None, :]).to(tl.int32)  # [P, E]
    dest = tl.sum(own * starts[None, :], axis=1) + rank
    offs_s = tl.arange(0, S_PAD)
    tl.store(sorted_ids_ptr + offs_s, tl.zeros((S_PAD,), dtype=tl.int32) + num_pairs,
             mask=offs_s < max_padded)
    tl.debug_barrier()
    tl.store(sorted_ids_ptr + dest, offs_p, mask=p_mask)
    offs_b = tl.arange(0, NB_PAD)
    end_blocks = ends // BLOCK_M
    done = (end_blocks[None, :] <= offs_b[:, None]) & (offs_e[None, :] < num_experts)
    expert = tl.sum(done.to(tl.int32), axis=1)  # [NB]
    expert = tl.where(expert < num_experts, expert, -1)
    tl.store(block_expert_ptr + offs_b, expert, mask=offs_b < max_padded // BLOCK_M)
    tl.store(total_ptr, tl.sum(padded, axis=0))


@triton.jit
def _sum_rows_kernel(down_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token, hidden block): out[t] = sum over j of down[t * TOP_K + j], float32
    in the order j = 0, 1, ..., rounded once."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    rows = down_ptr + t.to(tl.int64) * TOP_K * hidden + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(rows + j * hidden, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * hidden + offs, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def sum_expert_rows(down: torch.Tensor, top_k: int, out: torch.Tensor) -> torch.Tensor:
    """out [T, H] = the sum of each token's top_k rows of down [T * top_k, H] (contiguous):
    one launch (torch.sum's reduction took ~4.8 us per layer at decode on an H200)."""
    tokens, hidden = out.shape
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_rows_kernel[(tokens, triton.cdiv(hidden, block))](down, out, hidden, TOP_K=top_k,
                                                            BLOCK=block, num_warps=4)
    return out


@triton.jit
def _moe_gemv_up_kernel(x_ptr, w13_ptr, ids_ptr, act_ptr, inter, K, stride_we, stride_wn,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                        EVEN: tl.constexpr, PDL: tl.constexpr):
    """Program (slot j, n tile) of one token: act[j, n] = silu(x W1[e]^T) * (x W3[e]^T)
    for its expert e = ids[j]. Its gate rows n and up rows inter + n are one tile
    [2 * BLOCK_N, BLOCK_K / VEC, VEC] (row 2i gate, 2i + 1 up), so both stream at once."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    j = tl.program_id(0)
    r = tl.arange(0, 2 * BLOCK_N)
    offs_n = tl.program_id(1) * BLOCK_N + r // 2
    row_mask = (offs_n < inter)[:, None, None]
    offs_k = (tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None]
    expert = tl.load(ids_ptr + j).to(tl.int64)
    rows = (w13_ptr + expert * stride_we
            + (offs_n + (r % 2) * inter)[:, None, None].to(tl.int64) * stride_wn)
    acc = tl.zeros([2 * BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN:
            w = tl.load(rows + k, mask=row_mask, other=0.0)
            x = tl.load(x_ptr + k)
        else:
            w = tl.load(rows + k, mask=row_mask & (k < K), other=0.0)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=2)
    gate, up = tl.split(tl.reshape(tl.sum(acc, axis=1), [BLOCK_N, 2]))
    act = gate / (1.0 + tl.exp(-gate)) * up
    offs_out = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(act_ptr + j * inter + offs_out, act.to(act_ptr.dtype.element_ty),
             mask=offs_out < inter)


@triton.jit
def _moe_gemv_down_kernel(act_ptr, w2_ptr, ids_ptr, weights_ptr, out_ptr, hidden, inter,
                          stride_we, stride_wn, TOP_K: tl.constexpr, SLOTS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                          EVEN: tl.constexpr, PDL: tl.constexpr):
    """Program (n tile) of one token: out[n] = sum over slots j of weights[j] * act[j]
    W2[ids[j]]^T, in float32, rounded once (the top-k sum in the same kernel). The rows of
    all slots are one tile [SLOTS * BLOCK_N, BLOCK_K / VEC, VEC] (SLOTS: TOP_K padded to a
    power of two), so every expert's rows stream at once."""
    pdl_wait(PDL)
    pdl_trigger(PDL)
    r = tl.arange(0, SLOTS * BLOCK_N)
    slot = r // BLOCK_N
    offs_n = tl.program_id(0) * BLOCK_N + r % BLOCK_N
    live = (slot < TOP_K) & (offs_n < hidden)
    row_mask = live[:, None, None]
    expert = tl.load(ids_ptr + slot, mask=slot < TOP_K, other=0).to(tl.int64)
    rows = (w2_ptr + expert[:, None, None] * stride_we
            + offs_n[:, None, None].to(tl.int64) * stride_wn)
    acts = act_ptr + slot[:, None, None] * inter
    offs_k = (tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None]
    acc = tl.zeros([SLOTS * BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + offs_k
        if EVEN:
            w = tl.load(rows + k, mask=row_mask, other=0.0)
            a = tl.load(acts + k, mask=row_mask, other=0.0)
        else:
            w = tl.load(rows + k, mask=row_mask & (k < inter), other=0.0)
            a = tl.load(acts + k, mask=row_mask & (k < inter), other=0.0)
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=2)
    weight = tl.load(weights_ptr + slot, mask=slot < TOP_K, other=0.0)
    dots = tl.reshape(tl.sum(acc, axis=1) * weight, [SLOTS, BLOCK_N])
    out = tl.sum(dots, axis=0)
    offs_out = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + offs_out, out.to(out_ptr.dtype.element_ty), mask=offs_out < hidden)


def _gemv_block_k(k: int, limit: int, vec: int) -> int:
    """The largest power of two <= limit dividing k (whole tiles), else limit (masked)."""
    block_k = limit
    while block_k > vec and k % block_k:
        block_k //= 2
    return block_k if k % block_k == 0 else limit


# moe_gemv's tiles: rows per program and K limit of the gate-up and the down kernel, products
# summed per thread (VEC); the best of benchmarks/moe_kernels.py --gemv-sweep on an H200
# (one channel's gate and up rows a program, whole 2,048-input rows, one channel's down
# rows of every slot: 24.58 us against 29.31 for the tiles before, Qwen3-30B-A3B's experts)
GEMV_CONFIG = dict(UP_BLOCK_N=1, UP_BLOCK_K=2048, DOWN_BLOCK_N=1, DOWN_BLOCK_K=256, VEC=16,
                   num_warps=4)


def moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, out: torch.Tensor,
             config: dict[str, int] | None = None) -> torch.Tensor:
    """One token's experts as two GEMV launches (no alignment, no padded blocks): the gated
    gate / up product of each of its top-k experts, then their down products weighted and
    summed in one kernel. x [1, H] contiguous, w13 [E, 2I, H], w2 [E, H, I]; `config`
    overrides GEMV_CONFIG's entries (benchmarks)."""
    cfg = {**GEMV_CONFIG, **(config or {})}
    top_k = topk_ids.shape[1]
    hidden = x.shape[1]
    inter = w13.shape[1] // 2
    ids = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1).to(torch.float32)
    act = torch.empty(top_k, inter, dtype=x.dtype, device=x.device)
    pdl = pdl_enabled(x.device)
    vec, warps = cfg["VEC"], cfg["num_warps"]
    up_n, up_k = cfg["UP_BLOCK_N"], _gemv_block_k(hidden, cfg["UP_BLOCK_K"], vec)
    _moe_gemv_up_kernel[(top_k, triton.cdiv(inter, up_n))](
        x, w13, ids, act, inter, hidden, w13.stride(0), w13.stride(1),
        BLOCK_N=up_n, BLOCK_K=up_k, VEC=vec, EVEN=hidden % up_k == 0, PDL=pdl,
        num_warps=warps, **launch_options(pdl))
    down_n, down_k = cfg["DOWN_BLOCK_N"], _gemv_block_k(inter, cfg["DOWN_BLOCK_K"], vec)
    _moe_gemv_down_kernel[(triton.cdiv(hidden, down_n),)](
        act, w2, ids, weights, out, hidden, inter, w2.stride(0), w2.stride(1), TOP_K=top_k,
        SLOTS=triton.next_power_of_2(top_k), BLOCK_N=down_n, BLOCK_K=down_k, VEC=vec,
        EVEN=inter % down_k == 0, PDL=pdl, num_warps=warps, **launch_options(pdl))
    return out


@triton.jit
def _align_count_kernel(ids_ptr, sorted_ids_ptr, hist_ptr, num_pairs, num_experts, max_padded,
                        E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Alignment, launch 1 of 3, one program per CHUNK slots of sorted_ids: fill its slots
    with the padding value and write its pairs' expert histogram (bin num_experts: lanes
    past the pairs) as row `program` of hist."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    tl.store(sorted_ids_ptr + offs, tl.zeros([CHUNK], dtype=tl.int32) + num_pairs,
             mask=offs < max_padded)
    m = offs < num_pairs
    e = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
    tl.store(hist_ptr + pid * E_PAD + tl.arange(0, E_PAD),
             tl.histogram(tl.where(m, e, num_experts), E_PAD))


@triton.jit
def _align_offsets_kernel(hist_ptr, block_expert_ptr, total_ptr, num_programs, num_experts,
                          max_padded, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
                          P_TILE: tl.constexpr, BLOCKS_CHUNK: tl.constexpr):
    """Alignment, launch 2 of 3, one program: the experts' counts from the histograms, their
    padded runs, the expert of every block and the total; each histogram row becomes that
    program's first slot per expert (its run's start plus the pairs of earlier programs)."""
    offs_e = tl.arange(0, E_PAD)
    offs_t = tl.arange(0, P_TILE)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for p0 in range(0, num_programs, P_TILE):
        rows = p0 + offs_t
        counts += tl.sum(tl.load(hist_ptr + rows[:, None] * E_PAD + offs_e[None, :],
                                 mask=rows[:, None] < num_programs, other=0), axis=0)
    counts = tl.where(offs_e < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(total_ptr, tl.sum(padded, axis=0))
    running = ends - padded
    for p0 in range(0, num_programs, P_TILE):
        rows = p0 + offs_t
        ptrs = hist_ptr + rows[:, None] * E_PAD + offs_e[None, :]
        m = rows[:, None] < num_programs
        h = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, running[None, :] + tl.cumsum(h, axis=0) - h, mask=m)
        running += tl.sum(h, axis=0)
    end_blocks = ends // BLOCK_M
    for b0 in range(0, max_padded // BLOCK_M, BLOCKS_CHUNK):
        offs_b = b0 + tl.arange(0, BLOCKS_CHUNK)
        done = (end_blocks[None, :] <= offs_b[:, None]) & (offs_e[None, :] < num_experts)
        expert = tl.sum(done.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + offs_b, tl.where(expert < num_experts, expert, -1),
                 mask=offs_b < max_padded // BLOCK_M)


@triton.jit
def _align_place_kernel(ids_ptr, sorted_ids_ptr, offsets_ptr, num_pairs,
                        E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Alignment, launch 3 of 3, one program per CHUNK pairs: each pair takes the next slot
    of its expert from the program's row of offsets (an atomic cursor, so the order inside
    a run varies; each row's result does not depend on it)."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    m = offs < num_pairs
    e = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
    slot = tl.atomic_add(offsets_ptr + pid * E_PAD + e, 1, mask=m, sem="relaxed", scope="cta")
    tl.store(sorted_ids_ptr + slot, offs, mask=m)


_SMALL_PAIRS = 64  # up to this many (token, expert) pairs align in one program
_ALIGN_CHUNK = 1024  # pairs (and sorted_ids slots) per program of the three-launch path
# Tokens served by moe_gemv (at most 1): on an H200 at Qwen3-30B-A3B's shapes it took
# 29.2 us per layer against the grouped GEMM's 33.1 (with alignment and top-k sum).
GEMV_MAX_TOKENS = 1


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sort the (token, expert) pairs by expert and pad each expert's run to block_m.

    Returns sorted_ids [max_padded] int32 (pair index t * k + j; num_pairs = padding),
    block_expert [max_padded / block_m] int32 (-1 past the end), total [1] int32 (padded
    pairs in use) and max_padded (a bound from the shapes alone). `torch_align_tokens` is
    the reference; inside an expert's run the pairs may come in another order."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    device = flat.device
    max_padded = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    if num_pairs <= _SMALL_PAIRS and num_experts <= 256:  # decode: one program
        _align_small_kernel[(1,)](
            flat, sorted_ids, block_expert, total, num_pairs, num_experts, max_padded,
            BLOCK_M=block_m, P_PAD=max(16, triton.next_power_of_2(num_pairs)),
            E_PAD=max(16, triton.next_power_of_2(num_experts)),
            S_PAD=triton.next_power_of_2(max_padded),
            NB_PAD=max(16, triton.next_power_of_2(max_padded // block_m)), num_warps=4)
        return sorted_ids, block_expert, total, max_padded
    # Three launches: histograms per chunk, run starts and offsets, then the placement.
    e_pad = max(16, triton.next_power_of_2(num_experts + 1))  # one bin for padding lanes
    programs = triton.cdiv(max_padded, _ALIGN_CHUNK)
    offsets = torch.empty(programs, e_pad, dtype=torch.int32, device=device)
    _align_count_kernel[(programs,)](flat, sorted_ids, offsets, num_pairs, num_experts,
                                     max_padded, E_PAD=e_pad, CHUNK=_ALIGN_CHUNK, num_warps=4)
    _align_offsets_kernel[(1,)](offsets, block_expert, total, programs, num_experts,
                                max_padded, BLOCK_M=block_m, E_PAD=e_pad,
                                P_TILE=max(2, 4096 // e_pad),
                                BLOCKS_CHUNK=max(16, 8192 // e_pad), num_warps=8)
    _align_place_kernel[(triton.cdiv(num_pairs, _ALIGN_CHUNK),)](
        flat, sorted_ids, offsets, num_pairs, E_PAD=e_pad, CHUNK=_ALIGN_CHUNK, num_warps=4)
    return sorted_ids, block_expert, total, max_padded


def _config(num_pairs: int) -> dict[str, int]:
    """Block sizes by the number of (token, expert) pairs; the small-batch ones are the
    decode path."""
    if num_pairs <= 64:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if num_pairs <= 512:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if num_pairs <= 4096:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
          sorted_ids: torch.Tensor, block_expert: torch.Tensor, total: torch.Tensor,
          max_padded: int, n: int, a_row_div: int, gated: bool, mul_weight: bool,
          cfg: dict[str, int]) -> None:
    k = a.shape[1]
    grid = (triton.cdiv(max_padded, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_expert, total,
        n, k, c.shape[0], max_padded,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, GATED=gated, MUL_WEIGHT=mul_weight,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], PRECISION="ieee",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def triton_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   gemv_max_tokens: int | None = None) -> torch.Tensor:
    """Same contract as reference.torch_experts: x [T, H], w13 [E, 2I, H], w2 [E, H, I].
    Up to `gemv_max_tokens` tokens (default GEMV_MAX_TOKENS) take `moe_gemv`."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    num_pairs = num_tokens * top_k
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    limit = GEMV_MAX_TOKENS if gemv_max_tokens is None else gemv_max_tokens
    if num_tokens <= min(limit, 1):
        return moe_gemv(x.contiguous(), w13, w2, topk_weights, topk_ids, out)
    cfg = _config(num_pairs)
    sorted_ids, block_expert, total, max_padded = align_tokens(
        topk_ids, num_experts, cfg["BLOCK_M"])
    x = x.contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, act, weights, sorted_ids, block_expert, total, max_padded, inter,
          a_row_div=top_k, gated=True, mul_weight=False, cfg=cfg)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _gemm(act, w2, down, weights, sorted_ids, block_expert, total, max_padded, hidden,
          a_row_div=1, gated=False, mul_weight=True, cfg=cfg)
    if top_k == 1:
        return down
    return sum_expert_rows(down, top_k, out)
