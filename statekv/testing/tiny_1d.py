"""Tiny random InternVL3 (HF-native, model_type "internvl") and LLaVA-OneVision checkpoints, for tests.

Each is written with `save_pretrained` together with a locally trained tokenizer that carries the family's
special tokens, the family's real chat template (the one transformers' conversion scripts
`convert_internvl_weights_to_hf.py` / `convert_llava_onevision_weights_to_hf.py` give the released `-hf`
checkpoints) and the family's preprocessor configs (image and video), so that the adapters read mean/std and frame
size from the checkpoint exactly as they do for a real one. Nothing here downloads anything.

Frames are small (112 px, patch 14): an InternVL frame becomes 8x8 patches -> pixel shuffle 0.5 -> 16 tokens;
a LLaVA-OneVision frame 8x8 SigLIP patches -> 2x2 bilinear pooling -> 16 tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

# transformers' convert_internvl_weights_to_hf.py: the template of the InternVL2.5 / InternVL3 `-hf` checkpoints.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# transformers' convert_llava_onevision_weights_to_hf.py: images first, then videos, then the text of each turn.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # InternVL's preprocessor configs
IMAGENET_STD = [0.229, 0.224, 0.225]
SIGLIP_MEAN = [0.5, 0.5, 0.5]  # LLaVA-OneVision's (SigLIP) preprocessor configs
SIGLIP_STD = [0.5, 0.5, 0.5]

_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
INTERNVL_EXTRA = ["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
LLAVA_ONEVISION_TOKENS = {"image_token": "<image>", "video_token": "<video>"}

# what the BPE merges are trained on: video QA phrases and the frame labels InternVL's processor writes
_CORPUS = [
    "What happens after the dog enters the room? The dog runs to the door and a cat jumps on the sofa.",
    "Describe the video. A bright square moves across a colour gradient from the top left corner.",
    "How many frames show the square? It appears in every frame, first near the left edge, then lower.",
    "You are a helpful assistant. user assistant question answer video image frame second yes no",
    "Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8: Frame9: Frame10: 0 1 2 3 4 5 6 7 8 9",
]


def _tokenizer(special: list[str], named: dict[str, str], template: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences, with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=named)
    fast.chat_template = template
    return fast


def build_internvl_tokenizer():
    """Qwen2-style tokenizer with InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>` (named as transformers'
    InternVL processor expects: `start_image_token`, `end_image_token`, `context_image_token`, `video_token`)."""
    special = _QWEN_SPECIAL + list(INTERNVL_TOKENS.values()) + INTERNVL_EXTRA
    return _tokenizer(special, INTERNVL_TOKENS, INTERNVL_CHAT_TEMPLATE)


def build_llava_onevision_tokenizer():
    """Qwen2-style tokenizer with LLaVA-OneVision's `<image>` and `<video>`."""
    special = _QWEN_SPECIAL + list(LLAVA_ONEVISION_TOKENS.values())
    return _tokenizer(special, LLAVA_ONEVISION_TOKENS, LLAVA_ONEVISION_CHAT_TEMPLATE)


def _text_config(tokenizer, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int, rope_theta: float, rope_factor: float | None) -> dict[str, Any]:
    """A Qwen2 text stack (the LLM of InternVL3 and LLaVA-OneVision-Qwen2), GQA, 1-D RoPE; `rope_factor` makes
    its RoPE transformers' "dynamic" (NTK) type with that factor, as some InternVL checkpoints ship it."""
    rope = ({"rope_type": "default", "rope_theta": rope_theta} if rope_factor is None else
            {"rope_type": "dynamic", "factor": rope_factor, "rope_theta": rope_theta})
    return dict(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def internvl_config(tokenizer, *, image_size: int = 112, patch_size: int = 14, hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, vision_depth: int = 2,
                    vision_dim: int = 32, max_position_embeddings: int = 4096, rope_theta: float = 10000.0,
                    rope_factor: float | None = None):
    """InternVLConfig: InternViT (depth 2) + pixel shuffle 0.5 + MLP projector + Qwen2 text stack."""
    from transformers import InternVLConfig

    vision = dict(hidden_size=vision_dim, num_hidden_layers=vision_depth, num_attention_heads=2,
                  intermediate_size=2 * vision_dim, image_size=[image_size, image_size],
                  patch_size=[patch_size, patch_size], use_mean_pooling=True, layer_scale_init_value=0.1)
    tokens = (image_size // patch_size) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    return InternVLConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                                 rope_theta=rope_theta, rope_factor=rope_factor),
        image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=tokens, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def llava_onevision_config(tokenizer, *, image_size: int = 112, patch_size: int = 14, hidden_size: int = 64,
                           num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, vision_depth: int = 2,
                           vision_dim: int = 32, max_position_embeddings: int = 4096,
                           rope_theta: float = 10000.0, rope_factor: float | None = None):
    """LlavaOnevisionConfig: SigLIP (depth 2, no head) + projector + 2x2 pooling + Qwen2 text stack."""
    from transformers import LlavaOnevisionConfig

    vision = dict(model_type="siglip_vision_model", hidden_size=vision_dim, num_hidden_layers=vision_depth,
                  num_attention_heads=2, intermediate_size=2 * vision_dim, image_size=image_size,
                  patch_size=patch_size, vision_use_head=False)
    s = image_size
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
                                 rope_theta=rope_theta, rope_factor=rope_factor),
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_ONEVISION_TOKENS["image_token"]),
        video_token_index=tokenizer.convert_tokens_to_ids(LLAVA_ONEVISION_TOKENS["video_token"]),
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=False,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
    )


def _video_preprocessor(processor_type: str, size: int, mean: list[float], std: list[float],
                        **extra: Any) -> dict[str, Any]:
    """The fields of a `video_preprocessor_config.json` (the video processors need torchvision to be built)."""
    return {"video_processor_type": processor_type, "do_resize": True, "size": {"height": size, "width": size},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": mean, "image_std": std, "do_convert_rgb": True, "do_sample_frames": False, **extra}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():  # random init is tiny; widen it so tokens differ clearly and greedy answers vary
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("image_newline"):
                p.normal_(0.0, 0.2)


def _save(path: str | os.PathLike, model_class: type, config: Any, tokenizer: Any, seed: int, *,
          image_processor: Any, video_preprocessor: dict[str, Any], processor: dict[str, Any], template: str) -> Path:
    """Random weights, tokenizer, image / video preprocessor configs, processor config and chat template."""
    path = Path(path)
    model = model_class(config).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    _write_json(path / "video_preprocessor_config.json", video_preprocessor)
    _write_json(path / "processor_config.json", processor)
    (path / "chat_template.jinja").write_text(template)
    return path


def save_tiny_internvl(path: str | os.PathLike, model_type: str = "internvl", *, seed: int = 0,
                       preprocessor: dict[str, Any] | None = None, **config_kwargs: Any) -> Path:
    """Write a tiny random InternVL3-style checkpoint (weights, config, tokenizer, processor configs) to `path`;
    `preprocessor` replaces the default video_preprocessor_config.json. (`model_type` is accepted so that the
    function fits a registry calling builder(path, model_type, ...).)"""
    from transformers import GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

    tokenizer = build_internvl_tokenizer()
    config = internvl_config(tokenizer, **config_kwargs)
    size = config.vision_config.image_size[0]
    return _save(
        path, InternVLForConditionalGeneration, config, tokenizer, seed,
        image_processor=GotOcr2ImageProcessorPil(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN,
                                                 image_std=IMAGENET_STD, do_convert_rgb=True),
        video_preprocessor=preprocessor or _video_preprocessor("InternVLVideoProcessor", size, IMAGENET_MEAN,
                                                               IMAGENET_STD, initial_shift=True),
        processor={"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length},
        template=INTERNVL_CHAT_TEMPLATE)


def save_tiny_llava_onevision(path: str | os.PathLike, model_type: str = "llava_onevision", *, seed: int = 0,
                              preprocessor: dict[str, Any] | None = None, **config_kwargs: Any) -> Path:
    """Write a tiny random LLaVA-OneVision checkpoint (weights, config, tokenizer, processor configs) to `path`;
    `preprocessor` replaces the default video_preprocessor_config.json. (`model_type`: as save_tiny_internvl.)"""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

    tokenizer = build_llava_onevision_tokenizer()
    config = llava_onevision_config(tokenizer, **config_kwargs)
    size = config.vision_config.image_size
    return _save(
        path, LlavaOnevisionForConditionalGeneration, config, tokenizer, seed,
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_mean=SIGLIP_MEAN,
                                                        image_std=SIGLIP_STD, do_convert_rgb=True,
                                                        image_grid_pinpoints=config.image_grid_pinpoints),
        video_preprocessor=preprocessor or _video_preprocessor("LlavaOnevisionVideoProcessor", size, SIGLIP_MEAN,
                                                               SIGLIP_STD),
        processor={"processor_class": "LlavaOnevisionProcessor",
                   "num_image_tokens": (size // config.vision_config.patch_size) ** 2,
                   "vision_feature_select_strategy": config.vision_feature_select_strategy,
                   "vision_aspect_ratio": config.vision_aspect_ratio},
        template=LLAVA_ONEVISION_CHAT_TEMPLATE)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
