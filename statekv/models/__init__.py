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
from statekv.versions import check_tested_versions

check_tested_versions()  # before the adapters reach into transformers: an untested release fails here, in one line

from statekv.locate import check_device, hub_kwargs, locate_checkpoint  # noqa: E402
from statekv.models.base import (ATTENTION_NAME, LAYOUTS, AnswerInputs, ChunkInputs, KVLayout,  # noqa: E402
                                 VideoLMAdapter, load_preprocessor_config)
from statekv.models.internvl import InternVLAdapter  # noqa: E402
from statekv.models.llava_onevision import LlavaOnevisionAdapter  # noqa: E402
from statekv.models.qwen2_5_vl import Qwen2_5_VLAdapter  # noqa: E402
from statekv.models.qwen2_vl import Qwen2VLAdapter  # noqa: E402
from statekv.models.qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter  # noqa: E402
from statekv.models.qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter  # noqa: E402

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[VideoLMAdapter]] = {
    cls.model_type: cls for cls in (Qwen2VLAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter,
                                     Qwen3_5Adapter, Qwen3_5MoeAdapter)
}
# one frame per chunk, 1-D RoPE (statekv/models/single_frame.py)
ADAPTERS.update({cls.model_type: cls for cls in (InternVLAdapter, LlavaOnevisionAdapter)})

__all__ = ["ADAPTERS", "LAYOUTS", "AnswerInputs", "ChunkInputs", "KVLayout", "VideoLMAdapter", "load_adapter"]


def load_adapter(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, adapter_options: dict[str, Any] | None = None,
                 **from_pretrained_kwargs: Any) -> VideoLMAdapter:
    """Load a checkpoint (local directory or hub id) with `from_pretrained` behind the adapter for its family.

    `adapter_options` go to the family's adapter (e.g. Qwen's `position_rule`); they are recorded with caches.
    Raises ModelNotFoundError (no such directory, hub id neither cached nor reachable), DeviceError, or
    UnsupportedModelError (no adapter for its model_type), each naming the model or device.
    """
    from transformers import AutoConfig, AutoTokenizer

    from statekv.attention import register_attention

    register_attention()
    check_device(device)
    # a local directory comes back absolute (that is what the cache records); a missing path or an unreachable
    # hub fails here in one line; revision/token/cache_dir reach the config and the tokenizer, not only the weights
    name, from_pretrained_kwargs = locate_checkpoint(name_or_path, **from_pretrained_kwargs)
    hub = hub_kwargs(from_pretrained_kwargs)
    config = AutoConfig.from_pretrained(name, **hub)
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
    # inference only: no parameter asks for gradients (FlopCounterMode's module tracker hooks every argument that
    # does, and transformers 5.25 passes a weight view into the kernelized linear-attention convolution)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(name, **hub)
    logger.info("loaded %s (%s) on %s as %s", name, model_type, device, dtype)
    return cls(model, tokenizer, name_or_path=name, preprocessor=load_preprocessor_config(name, **hub),
               **(adapter_options or {}))
