"""Attention ops: chunk-prefill attention with per-key attention mass (torch reference, SDPA, Triton)."""

from statekv.ops.attention import BACKENDS, attention, attention_reference, attention_sdpa, check_attention_shapes

__all__ = ["BACKENDS", "attention", "attention_reference", "attention_sdpa", "check_attention_shapes"]
