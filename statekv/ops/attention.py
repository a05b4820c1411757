"""Chunk-prefill attention that can also return the attention mass each key receives.

Boundary: tensors in, tensors out. The torch reference and the SDPA fast path live here; the Triton kernels live in
`triton_attention.py` and are imported only when that backend is chosen, so this module works without triton.

Masking rule (one rule for text prefix, video chunks and decoding): query i sits at absolute key position
kv - q + i and sees key j iff j <= kv - q + i. Keys before the last q (prefix | carried state) are open to every
query; the last q keys (the chunk itself) are causal.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from statekv.ops.common import check_attention_shapes, triton_interpret_requested, visible_mask

__all__ = ["BACKENDS", "attention", "attention_reference", "attention_sdpa", "check_attention_shapes",
           "probability_floor", "triton_interpret_requested", "visible_mask"]

BACKENDS = ("auto", "torch", "triton")


# Softmax without denormals. A float32 exp whose result is subnormal (argument in about [-103.3, -87.3]) or
# underflows takes a slow path on x86 CPUs (measured on this machine: ~40x / ~12x a normal exp, and even exp(-inf)
# ~3.5x), and peaked attention heads put most of a row there: the plain softmax of the key-score path then cost
# more than the rest of the attention. So every exp argument is clamped to at least `_LOG_TINY + log(kv) + 1`
# relative to the row max (a normal result), and what lands below `_LOG_TINY + log(kv) + 1.5` is set to exactly 0
# afterwards: every probability kept is >= e^1.5 * tiny after normalising by a row sum <= kv, i.e. a normal float,
# and the mass dropped per query row is < kv * e^1.5 * kv * tiny (4.5 * kv**2 * 1.2e-38: 2e-28 at kv = 65536).
# No global floating-point mode (flush-to-zero) is touched: it is per thread, and it is the user's.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def probability_floor(kv_len: int) -> float:
    """Log-probability (relative to the row max) below which the torch path sets a probability to exactly 0.

    Above it every probability is a normal float32 (no denormals); see the comment above `_LOG_TINY`.
    """
    return _LOG_TINY + math.log(kv_len) + 1.5


def _softmax_without_denormals_(s: torch.Tensor, kv_len: int) -> torch.Tensor:
    """In place: s [..., kv] float32 logits (-inf where hidden) -> probabilities with no subnormal value.

    Entries below `probability_floor(kv_len)` (relative to the row max) become exactly 0; every exp runs on a
    normal argument. Every row must see at least one key.
    """
    floor = probability_floor(kv_len)
    s.sub_(s.amax(dim=-1, keepdim=True)).clamp_min_(floor - 0.5).exp_()  # -inf (hidden) -> the clamp too
    F.threshold_(s, math.exp(floor), 0.0)  # clamped and (nearly) clamped entries -> exactly 0
    return s.mul_(s.sum(dim=-1, keepdim=True).reciprocal_())  # the row max is 1, so the sum is in [1, kv]


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    key_scores: bool = False,
    block_q: int = 128,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 attention by query blocks; never holds more than one block's [B, H, block_q, kv] scores.

    The torch key-score path (CPU, or any device without triton). One pass per query block: logits, the
    denormal-free softmax (`probability_floor`: probabilities below it are exactly 0, and none is subnormal), the
    output and the per-key mass from the same probabilities.
    """
    B, H, Hkv, q_len, kv_len, D = check_attention_shapes(query, key, value)
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    G = H // Hkv
    q5 = query.unflatten(1, (Hkv, G))  # (B, Hkv, G, q, D): head h uses KV head h // G
    k_t = key.float().transpose(-1, -2)  # (B, Hkv, D, kv)
    v = value.float()  # (B, Hkv, kv, D)
    out = torch.empty(B, q_len, H, D, dtype=query.dtype, device=query.device)
    scores = torch.zeros(B, Hkv, kv_len, dtype=torch.float32, device=query.device) if key_scores else None
    tail = kv_len - q_len  # keys before the last q_len (prefix | state) are open to every query
    for start in range(0, q_len, block_q):
        end = min(start + block_q, q_len)
        n = end - start
        # Fold the group's heads into rows so K is shared, not repeated; scale the (smaller) queries, not the logits.
        qb = q5[:, :, :, start:end].reshape(B, Hkv, G * n, D).float() * scaling  # (B, Hkv, G*n, D)
        s = torch.matmul(qb, k_t)  # (B, Hkv, G*n, kv)
        hidden = ~visible_mask(start, end, q_len, kv_len, query.device)[:, tail:]  # (n, q_len): the chunk's keys
        s.view(B, Hkv, G, n, kv_len)[..., tail:].masked_fill_(hidden, float("-inf"))
        p = _softmax_without_denormals_(s, kv_len)  # (B, Hkv, G*n, kv), in place
        o = torch.matmul(p, v)  # (B, Hkv, G*n, D)
        out[:, start:end] = o.view(B, Hkv, G, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, H, D).to(query.dtype)
        if scores is not None:
            scores += p.sum(dim=2)  # (B, Hkv, kv)
    return out, scores


def attention_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """Output [B, q, H, D] from torch SDPA with the bottom-right-aligned mask (no key scores)."""
    B, H, Hkv, q_len, kv_len, D = check_attention_shapes(query, key, value)
    if q_len == 1:
        mask, causal = None, False  # one query sees every key
    elif q_len == kv_len:
        mask, causal = None, True  # top-left == bottom-right alignment only when q == kv
    else:
        mask, causal = visible_mask(0, q_len, q_len, kv_len, query.device), False  # (q, kv)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=H != Hkv
    )  # (B, H, q, D)
    return out.transpose(1, 2).contiguous()


@functools.cache
def _triton_available() -> bool:
    """True when triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    key_scores: bool = False,
    block_q: int = 128,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (out [B, q, H, D], key scores [B, Hkv, kv] float32 or None); see the module docstring for the mask."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    check_attention_shapes(query, key, value)
    if backend == "auto":
        backend = "triton" if query.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        if not query.is_cuda and not triton_interpret_requested():
            raise ValueError("backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
        from statekv.ops.triton_attention import attention_triton

        return attention_triton(query, key, value, scaling=scaling, key_scores=key_scores)
    if key_scores:
        return attention_reference(query, key, value, scaling=scaling, key_scores=True, block_q=block_q)
    return attention_sdpa(query, key, value, scaling=scaling), None
