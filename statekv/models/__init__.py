"""Model adapters, one file per family, chosen by the checkpoint's `model_type`.

Adding a family = one adapter file (statekv/models/<family>.py, see the contract in statekv/models/base.py) and
one entry in `ADAPTERS`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from statekv.errors import UnsupportedModelError
from statekv.models.base import (ATTENTION_NAME, LAYOUTS, AnswerInputs, ChunkInputs, KVLayout, VideoLMAdapter,
                                 load_preprocessor_config)
from statekv.models.qwen2_5_vl import Qwen2_5_VLAdapter
from statekv.models.qwen2_vl import Qwen2VLAdapter
from statekv.models.qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
from statekv.models.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[VideoLMAdapter]] = {
    cls.model_type: cls for cls in (Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter,
                                     Qwen3_5Adapter, Qwen3_5MoeAdapter)
}

__all__ = ["ADAPTERS", "LAYOUTS", "AnswerInputs", "ChunkInputs", "KVLayout", "VideoLMAdapter", "load_adapter"]


def load_adapter(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, adapter_options: dict[str, Any] | None = None,
                 **from_pretrained_kwargs: Any) -> VideoLMAdapter:
    """Load a checkpoint (local directory or hub id) with `from_pretrained` behind the adapter for its family.

    `adapter_options` go to the family's adapter (e.g. Qwen's `position_rule`); they are recorded with caches.
    """
    from transformers import AutoConfig, AutoTokenizer

    from statekv.attention import register_attention

    register_attention()
    name = os.fspath(name_or_path)
    if os.path.exists(name) and not os.path.isdir(name):
        raise UnsupportedModelError(name, None, sorted(ADAPTERS)) from None
    config = AutoConfig.from_pretrained(name)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(name, model_type, sorted(ADAPTERS))
    cls = ADAPTERS[model_type]
    model = cls.model_class.from_pretrained(
        name,
        dtype=dtype,
        attn_implementation={"text_config": ATTENTION_NAME, "vision_config": "sdpa", "": "sdpa"},
        **from_pretrained_kwargs,
    )
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    logger.info("loaded %s (%s) on %s as %s", name, model_type, device, dtype)
    return cls(model, tokenizer, name_or_path=name, preprocessor=load_preprocessor_config(name),
               **(adapter_options or {}))
