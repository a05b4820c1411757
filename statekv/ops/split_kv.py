"""Attention over a read-only shared context plus a private tail, merged by log-sum-exp (split-KV decoding).

Why: questions about one video all attend to the same video KV (prefix + chunks, read-only) and each to its own
question and answer tokens (its "tail"). Attending to the two parts separately and merging the partial results
with their log-sum-exp (flash-decoding's rule) gives exactly softmax over [shared | tail] without ever
concatenating them: the shared KV is never copied per question, and one fused call over the shared part serves
every query of every request of a step (all queries see all shared keys, so the batch's queries and the query
heads of a GQA group fold into one long query axis against the Hkv shared heads).

Boundary: tensors in, tensors out; no model knowledge.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["attention_lse", "attention_lse_reference", "merge_partials", "shared_attention", "tail_attention"]


def attention_lse_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (out [B, H, L, D], lse [B, H, L]) of softmax attention; H == Hkv; `mask` broadcasts to [B, H, L, S]
    (True = visible). A row that sees no key gets out 0 and lse -inf."""
    s = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scaling)  # (B, H, L, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, L)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))  # -inf rows -> exp(-inf) = 0
    return torch.matmul(p, value.float()), lse


# whether the CUDA memory-efficient kernel can serve here (set False after its first refusal, said once in the log)
_CUDA_FUSED = {"usable": True}


def attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, L, D] in the query's dtype, lse [B, H, L] float32) of unmasked attention, H == Hkv, from the
    fused kernel that also returns the log-sum-exp (CPU flash; CUDA memory-efficient); the float32 reference
    elsewhere."""
    if key.shape[2] == 0:  # nothing to attend to: contributes nothing to the merge
        B, H, L, D = query.shape
        return (query.new_zeros(B, H, L, D),
                torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=query.device))
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, scale=scaling)[:2]
        return out, lse
    if query.device.type == "cuda" and _CUDA_FUSED["usable"]:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, None, True, 0.0, False, scale=scaling)[:2]
            return out, lse[..., :query.shape[2]]  # the kernel may pad the lse's query axis
        except (RuntimeError, NotImplementedError) as err:  # no kernel for this GPU / dtype / head size
            _CUDA_FUSED["usable"] = False
            logger.warning("fused attention with log-sum-exp unavailable on %s (%s); answering uses the float32 "
                           "reference attention from now on", query.device, str(err).splitlines()[0])
    out, lse = attention_lse_reference(query, key, value, scaling=scaling)
    return out.to(query.dtype), lse


def shared_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query against the shared keys, no mask: query [B, H, L, D], key/value [1, Hkv, S, D] ->
    (out [B, H, L, D], lse [B, H, L] float32). One fused call: (B, G, L) fold into the query axis per KV head."""
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    q = query.reshape(B, Hkv, G, L, D).permute(1, 0, 2, 3, 4).reshape(1, Hkv, B * G * L, D)  # head h -> KV head h//G
    out, lse = attention_lse(q.contiguous(), key, value, scaling=scaling)  # (1, Hkv, B*G*L, D), (1, Hkv, B*G*L)
    out = out.view(Hkv, B, G, L, D).permute(1, 0, 2, 3, 4).reshape(B, H, L, D)
    lse = lse.view(Hkv, B, G, L).permute(1, 0, 2, 3).reshape(B, H, L)
    return out, lse


def tail_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, *,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries against each row's own tail: query [B, H, L, D], key/value [B, Hkv, T, D], visible [B, L, T] bool
    (None: every key) -> float32 (out [B, H, L, D], lse [B, H, L]); GQA groups share their KV head, not repeated."""
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    q = query.reshape(B, Hkv, G * L, D)  # (B, Hkv, G*L, D): the group's heads as rows
    if visible is None:  # every row sees its whole tail: the fused kernel
        out, lse = attention_lse(q.contiguous(), key, value, scaling=scaling)
        return out.reshape(B, H, L, D), lse.reshape(B, H, L)
    mask = visible.unsqueeze(1).unsqueeze(2).expand(B, 1, G, L, -1).reshape(B, 1, G * L, -1)
    out, lse = attention_lse_reference(q, key, value, scaling=scaling, mask=mask)
    return out.view(B, H, L, D), lse.view(B, H, L)


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each one's (out [.., L, D], lse [.., L])."""
    top = torch.maximum(lse_a, lse_b)  # finite: every query sees at least its own token in the tail
    wa = torch.exp(lse_a - top).unsqueeze(-1)
    wb = torch.exp(lse_b - top).unsqueeze(-1)
    return ((out_a.float() * wa + out_b.float() * wb) / (wa + wb)).to(dtype)
