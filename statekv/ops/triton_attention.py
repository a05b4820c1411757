"""Triton kernels for chunk-prefill attention with key scores, in two passes (as in the StateKV paper's code).

Pass 1 is a flash-attention forward (online softmax over key blocks) that also writes each query row's
log-sum-exp. Pass 2 gives each program one KV head's key block, recomputes s = scaling * q.k for every query
block and every query head of the group, and sums exp(s - lse): the attention mass each key receives. A program
owns its key block, so no atomics are needed. Mask and GQA mapping as in `common.py`. Importing this module
imports triton; on CPU set TRITON_INTERPRET=1 before that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from statekv.ops.common import check_attention_shapes, triton_interpret_requested

MAX_HEAD_DIM = 256
# triton.jit reads TRITON_INTERPRET when the kernels below are decorated. The interpreter's tl.dot multiplies
# bfloat16 bit patterns (triton-lang/triton#11584), so interpreted kernels upcast dot operands to float32.
INTERPRETED = triton_interpret_requested()


@triton.jit
def _flash_forward_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lm,
    H, q_len, kv_len, scaling,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP  # GQA: query head h reads KV head h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = offs_d < HEAD_DIM  # head_dim padded up to a power of two

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    last = kv_len - q_len + rows  # last key each row may see; tail rows (>= q) see all keys, so never all -inf

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks past the block's last visible key are fully masked: skip them.
    end_n = tl.minimum(kv_len, kv_len - q_len + tl.minimum(start_m + BLOCK_M, q_len))
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < kv_len
        k = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scaling  # (BLOCK_M, BLOCK_N)
        s = tl.where(col_ok[None, :] & (cols[None, :] <= last[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        p = p.to(V.dtype.element_ty)  # P @ V in the input dtype, as flash attention does
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + b * stride_lb + h * stride_lh + rows * stride_lm, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _key_scores_kernel(
    Q, K, Lse, Scores,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_lm,
    stride_sb, stride_sh, stride_sn,
    Hkv, q_len, kv_len, scaling,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = (bg % Hkv).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < kv_len
    d_ok = offs_d < HEAD_DIM

    k = tl.load(
        K + b * stride_kb + g * stride_kh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=col_ok[None, :] & d_ok[:, None],
        other=0.0,
    )  # (BLOCK_D, BLOCK_N)
    if DOT_F32:
        k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_N], tl.float32)
    # Rows before the first one that sees this block's first key contribute nothing: start at its query block.
    first_row = tl.maximum(start_n - (kv_len - q_len), 0)
    lo = (first_row // BLOCK_M) * BLOCK_M
    for j in range(0, GROUP):
        h = g * GROUP + j
        q_base = Q + b * stride_qb + h * stride_qh
        lse_base = Lse + b * stride_lb + h * stride_lh
        for start_m in range(lo, q_len, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < q_len
            q = tl.load(
                q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_D)
            if DOT_F32:
                q = q.to(tl.float32)
            lse = tl.load(lse_base + rows * stride_lm, mask=row_ok, other=0.0)  # (BLOCK_M,)
            s = tl.dot(q, k, input_precision=PRECISION) * scaling  # (BLOCK_M, BLOCK_N)
            visible = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= (kv_len - q_len + rows)[:, None])
            acc += tl.sum(tl.exp(tl.where(visible, s - lse[:, None], float("-inf"))), 0)
    tl.store(Scores + b * stride_sb + g * stride_sh + cols * stride_sn, acc, mask=col_ok)


def _block_sizes(head_dim: int, block_m: int | None, block_n: int | None) -> tuple[int, int, int]:
    """Pick (BLOCK_M, BLOCK_N, BLOCK_D); validate explicit choices."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is larger than the Triton kernels support ({MAX_HEAD_DIM})")
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = block_m or (64 if block_d <= 128 else 32)  # smaller tiles keep head_dim 256 within shared memory
    block_n = block_n or (64 if block_d <= 128 else 32)
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    return block_m, block_n, block_d


def _precision(dtype: torch.dtype) -> str:
    """Float32 inputs use exact IEEE dots (tf32 would drift from the reference); half types ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: return (out [B, q, H, D] in the query's dtype, lse [B, H, q] float32)."""
    B, H, Hkv, q_len, kv_len, D = check_attention_shapes(query, key, value)
    block_m, block_n, block_d = _block_sizes(D, block_m, block_n)
    out = torch.empty(B, q_len, H, D, dtype=query.dtype, device=query.device)
    lse = torch.empty(B, H, q_len, dtype=torch.float32, device=query.device)
    grid = (triton.cdiv(q_len, block_m), B * H)
    _flash_forward_kernel[grid](
        query, key, value, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *lse.stride(),
        H, q_len, kv_len, scaling,
        GROUP=H // Hkv, HEAD_DIM=D, PRECISION=_precision(query.dtype), DOT_F32=INTERPRETED,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return out, lse


def key_scores_from_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    *,
    scaling: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Pass 2: attention mass per key [B, Hkv, kv] float32, summed over queries and the group's query heads."""
    B, H, Hkv, q_len, kv_len, D = check_attention_shapes(query, key, key)
    if lse.shape != (B, H, q_len) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {(B, H, q_len)}, got {lse.dtype} {tuple(lse.shape)}")
    block_m, block_n, block_d = _block_sizes(D, block_m, block_n)
    scores = torch.empty(B, Hkv, kv_len, dtype=torch.float32, device=query.device)
    grid = (triton.cdiv(kv_len, block_n), B * Hkv)
    _key_scores_kernel[grid](
        query, key, lse, scores,
        *query.stride(), *key.stride(), *lse.stride(), *scores.stride(),
        Hkv, q_len, kv_len, scaling,
        GROUP=H // Hkv, HEAD_DIM=D, PRECISION=_precision(query.dtype), DOT_F32=INTERPRETED,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return scores


def attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    key_scores: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (out [B, q, H, D], key scores [B, Hkv, kv] float32 or None) from the two Triton passes."""
    out, lse = flash_forward(query, key, value, scaling=scaling, block_m=block_m, block_n=block_n)
    if not key_scores:
        return out, None
    return out, key_scores_from_lse(query, key, lse, scaling=scaling, block_m=block_m, block_n=block_n)
