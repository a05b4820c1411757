"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints with a locally trained tokenizer, for tests and the offline demo.

Nothing here downloads anything: the tokenizer is trained on a few sentences, the weights are random, and the
result is written with `save_pretrained` so that it loads back through the same `from_pretrained` path that real
checkpoints use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Qwen's ChatML template, reduced to what video QA needs (system prompt, text / video / image parts).
CHAT_TEMPLATE = (
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The families a tiny checkpoint can be built for, with the transformers class that builds it: the registry
# `statekv tiny-model` lists (add a family here and in `tiny_config`).
FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_CORPUS = [
    "What happens after the dog enters the room? A cat jumps on the table and the dog runs away.",
    "Describe the video. A red square moves across a blue gradient from left to right.",
    "How many people are there? There are two people talking near a window in the kitchen.",
    "What colour is the car? The car is green and it stops at the corner of the street.",
    "You are a helpful assistant. system user assistant question answer video frame time second.",
    "0 1 2 3 4 5 6 7 8 9 yes no first then after before finally",
]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, vision_depth: int = 2, vision_dim: int = 32):
    """A Qwen2-VL or Qwen2.5-VL config small enough for CPU tests, wired to the tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": mrope_section},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden_size, num_heads=2,
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_dim, out_hidden_size=hidden_size, num_heads=2,
                      intermediate_size=2 * vision_dim, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1],
                      tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    raise ValueError(f"unknown tiny model family {family!r}; expected 'qwen2_vl' or 'qwen2_5_vl'")


def save_tiny_checkpoint(path: str | os.PathLike, family: str = "qwen2_vl", *, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny random checkpoint (weights, config, tokenizer with chat template) to `path`."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; known families: {', '.join(FAMILIES)}")
    path = Path(path)
    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer, **config_kwargs)
    cls = getattr(transformers, FAMILIES[family])
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random init is tiny; widen it so tokens differ clearly and greedy answers vary
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
