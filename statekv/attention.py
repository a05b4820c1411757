"""Our attention function, registered with transformers' `AttentionInterface` under the name "statekv".

It ignores transformers' mask: every call we make has the shape [past keys, open | the new tokens, causal], which
is the rule `statekv.ops.attention` applies (see there). When the caller passes `statekv_scores=dict`, the
attention mass each key receives is recorded in it under the layer index; `statekv_backend` picks the kernel;
`statekv_batch` answers questions over a shared video KV or their retrieved chunks (statekv/decoding.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from statekv.models.base import ATTENTION_NAME
from statekv.ops import attention

def statekv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      statekv_scores: dict[int, torch.Tensor] | None = None, statekv_backend: str = "auto",
                      statekv_batch: Any = None, **_: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, q, D), key/value (B, Hkv, kv, D) post-RoPE → output (B, q, H, D).

    With `statekv_batch` (a `statekv.decoding.StepContext`, when answering) the keys are the step's new tokens:
    the context attends them to the video's shared KV (or a retrieval question's chosen chunks) and to each
    question's own tokens (statekv/decoding.py).
    """
    if statekv_batch is not None:
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return statekv_batch.attend(module.layer_idx, query, key, value, scaling), None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out, scores = attention(query, key, value, scaling=scaling, key_scores=statekv_scores is not None,
                            backend=statekv_backend)
    if statekv_scores is not None:
        statekv_scores[module.layer_idx] = scores
    return out, None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Our attention applies its own mask; skip building transformers' one."""
    return None


@functools.cache
def register_attention() -> None:
    """Register the attention function (and a no-op mask builder) with transformers, once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, statekv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
