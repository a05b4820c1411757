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
# The logits are computed in base 2 (the queries are scaled by log2(e)) because torch's CPU `exp2` costs about
# half its `exp` (0.36 vs 0.68 ms for a chunk's 338 k logits, 1 thread, AVX2), and the exp was the largest cost
# after the two matmuls.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
_LOG2_E = 1.0 / math.log(2.0)


def probability_floor(kv_len: int) -> float:
    """Log-probability (relative to the row max) below which the torch path sets a probability to exactly 0.

    Above it every probability is a normal float32 (no denormals); see the comment above `_LOG_TINY`.
    """
    return _LOG_TINY + math.log(kv_len) + 1.5


def _unnormalised_probabilities_(s2: torch.Tensor, kv_len: int) -> torch.Tensor:
    """In place: s2 [..., kv] float32 base-2 logits (-inf where hidden) -> exp of the logits relative to the row
    max (the row max becomes 1), with no subnormal value.

    Entries below `probability_floor(kv_len)` (natural log, relative to the row max) become exactly 0; every exp2
    runs on a normal argument. Every row must see at least one key. Dividing by the row sum (in [1, kv]) keeps every
    value normal.
    """
    floor = probability_floor(kv_len)
    s2.sub_(s2.amax(dim=-1, keepdim=True)).clamp_min_((floor - 0.5) * _LOG2_E).exp2_()  # -inf -> the clamp too
    return F.threshold_(s2, math.exp(floor), 0.0)  # clamped and (nearly) clamped entries -> exactly 0


@functools.lru_cache(maxsize=8)
def _chunk_bias(q_start: int, q_end: int, q_len: int, device: torch.device) -> torch.Tensor:
    """Float32 [q_end - q_start, q_len]: 0 where query row i may see the chunk's key j, -inf where not.

    Added to the logits of the chunk's own keys (~5x faster than a broadcast `masked_fill_` of the strided view).
    Cached (read-only: never modify it): every layer of a prefill step asks for the same bias.
    """
    hidden = ~visible_mask(q_start, q_end, q_len, q_len, device)  # (n, q_len)
    return torch.zeros(hidden.shape, dtype=torch.float32, device=device).masked_fill_(hidden, float("-inf"))


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

    The torch key-score path (CPU, or any device without triton). One pass per query block: base-2 logits, their
    denormal-free exp2 relative to the row max (`probability_floor`: probabilities below it are exactly 0, and none
    is subnormal), the output and the per-key mass from the same values, each normalised by the row sum as it is
    reduced (the output rows after P @ V, then P itself for the mass).
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
        # (B, Hkv, G*n, D): fold the group's heads into rows so K is shared, not repeated; scale the (smaller)
        # queries, not the logits, by scaling * log2(e): base-2 logits for exp2
        qb = q5[:, :, :, start:end].reshape(B, Hkv, G * n, D).float() * (scaling * _LOG2_E)
        s = torch.matmul(qb, k_t)  # (B, Hkv, G*n, kv)
        s.view(B, Hkv, G, n, kv_len)[..., tail:].add_(_chunk_bias(start, end, q_len, query.device))  # causal
        e = _unnormalised_probabilities_(s, kv_len)  # (B, Hkv, G*n, kv), in place; row max 1
        inv = e.sum(dim=-1, keepdim=True).reciprocal_()  # (B, Hkv, G*n, 1): 1 / row sum, in [1/kv, 1]
        # normalise the (G*n, D) output rows rather than the (G*n, kv) probabilities
        o = torch.matmul(e, v).mul_(inv)  # (B, Hkv, G*n, D)
        out[:, start:end] = o.view(B, Hkv, G, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, H, D).to(query.dtype)
        if scores is not None:
            # (B, Hkv, kv): sum_i e_ij / rowsum_i. Elementwise, not as a (1/rowsum) @ e matvec: about as fast, and a
            # FLOP counter then sees the same matmuls as Full's attention (tests/statekv/test_bench_prefill.py)
            scores += e.mul_(inv).sum(dim=2)
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
