"""Tiny random checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) with a locally trained tokenizer, for tests and the demo.

Nothing here downloads anything: the tokenizer is trained on a few sentences, the weights are random, and the
result is written with `save_pretrained` so that it loads back through the same `from_pretrained` path that real
checkpoints use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from statekv.testing.tiny_1d import save_tiny_internvl, save_tiny_llava_onevision

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


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen configs' special-token ids (image/video pads, vision start/end) in `tokenizer`."""
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def build_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template, trained on `corpus` (default: a
    few sentences about videos)."""
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
    tok.train_from_iterator(_CORPUS if corpus is None else corpus, trainer=trainer)
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
    ids = vision_token_ids(tokenizer)
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


def preprocessor_config(family: str, *, image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                        image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
                        min_pixels: int = 128 * 28 * 28, max_pixels: int = 768 * 28 * 28) -> dict:
    """The video preprocessor config a Qwen2-VL / Qwen2.5-VL checkpoint ships (video_preprocessor_config.json)."""
    return {"video_processor_type": "Qwen2VLVideoProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(image_mean),
            "image_std": list(image_std), "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


INITS = ("wide", "default")  # save_tiny_checkpoint(init=...): widened N(0, 0.2) weights, or the class's own init


def save_tiny_checkpoint(path: str | os.PathLike, family: str = "qwen2_vl", *, seed: int = 0,
                         preprocessor: dict | None = None, init: str = "wide", **config_kwargs) -> Path:
    """Write a tiny random checkpoint of `family` (weights, config, tokenizer with chat template, video preprocessor
    config: `preprocessor`, else the family's) to `path`.

    `init="wide"` (the tests' default) redraws every matrix from N(0, 0.2) so tokens differ clearly; `"default"`
    keeps the model class's own initialisation (`_init_weights`, the config's `initializer_range`): far flatter
    logits, so benchmarks see both peaked and flat attention.
    """
    if family not in TINY_CHECKPOINTS:
        raise ValueError(f"no tiny checkpoint for model_type {family!r}; add one to "
                         f"statekv.testing.checkpoints.TINY_CHECKPOINTS (have: {', '.join(TINY_CHECKPOINTS)})")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    path = TINY_CHECKPOINTS[family](Path(path), family, seed=seed, preprocessor=preprocessor, **config_kwargs)
    if init == "default":
        _save_default_init_weights(path, seed=seed)
    return path


def _save_default_init_weights(path: Path, *, seed: int) -> None:
    """Overwrite the checkpoint's weights with a fresh model of its config, as its class initialises it."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).eval().save_pretrained(path)


def _widen_random_init(model) -> None:
    """Random init is tiny; widen it so tokens differ clearly and greedy answers vary."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)


def _save_qwen2(path: Path, family: str, *, seed: int, preprocessor: dict | None, **config_kwargs) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer, **config_kwargs)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    _widen_random_init(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(path / "video_preprocessor_config.json", "w") as f:
        json.dump(preprocessor if preprocessor is not None else preprocessor_config(family), f, indent=1)
    return path


# --- Qwen3-VL ---------------------------------------------------------------------------------------------------

# The chat template of the Qwen3-VL Instruct checkpoints (chat_template.json of Qwen/Qwen3-VL-*-Instruct), verbatim:
# no default system prompt, `add_vision_id` numbering, tool calls and tool responses.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Special tokens of the Qwen3-VL tokenizer beyond the ones `build_tokenizer` already has; tool/think markers are
# plain added tokens there, as in the real tokenizer.
QWEN3_VL_EXTRA_SPECIAL_TOKENS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                 "<|quad_start|>", "<|quad_end|>", "<|vision_pad|>"]
QWEN3_VL_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# video_preprocessor_config.json / preprocessor_config.json of Qwen/Qwen3-VL-*-Instruct (0.5 mean/std, patch 16;
# video size = total pixels over all frames: min 4096, max 25165824). Plain JSON: the processor classes need torchvision.
QWEN3_VL_VIDEO_PROCESSOR = dict(video_processor_type="Qwen3VLVideoProcessor",
    do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, do_sample_frames=True, fps=2,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], max_frames=768, min_frames=4, merge_size=2,
    patch_size=16, resample=3, rescale_factor=1 / 255, return_metadata=False,
    size={"longest_edge": 25165824, "shortest_edge": 4096}, temporal_patch_size=2,
)
QWEN3_VL_IMAGE_PROCESSOR = dict(image_processor_type="Qwen2VLImageProcessor",
    do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5], merge_size=2, patch_size=16, resample=3, rescale_factor=1 / 255,
    size={"longest_edge": 16777216, "shortest_edge": 65536}, temporal_patch_size=2,
)


def write_qwen3_vl_processor_files(path: Path, preprocessor: dict | None = None) -> None:
    """The (video) preprocessor configs a Qwen3-VL / Qwen3.5 repo ships (`preprocessor`: the video one, else the
    release's), naming `Qwen3VLProcessor`."""
    video = preprocessor if preprocessor is not None else QWEN3_VL_VIDEO_PROCESSOR
    for name, processor_config in (("preprocessor_config.json", QWEN3_VL_IMAGE_PROCESSOR),
                                   ("video_preprocessor_config.json", video)):
        (path / name).write_text(json.dumps({**processor_config, "processor_class": "Qwen3VLProcessor"}, indent=2))


def build_qwen3_vl_tokenizer():
    """`build_tokenizer`'s BPE with every Qwen3-VL special token and the Qwen3-VL Instruct chat template."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": QWEN3_VL_EXTRA_SPECIAL_TOKENS},
                                 replace_extra_special_tokens=False)
    tokenizer.add_tokens(QWEN3_VL_ADDED_TOKENS)
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tokenizer


def qwen3_vl_tiny_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4,
                         num_kv_heads: int = 2, vision_depth: int = 2, vision_dim: int = 32,
                         deepstack_visual_indexes: tuple[int, ...] = (0, 1), moe: bool = False):
    """A Qwen3-VL config for CPU tests: GQA, interleaved M-RoPE, patch 16, deepstack into the first text layers.

    Three text layers by default so that deepstack (two vision layers' features) reaches some but not all of them.
    `moe`: the Qwen3-VL-MoE variant (4 experts, 2 per token, in every text layer).
    """
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
    ids = vision_token_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": mrope_section,
                         "mrope_interleaved": True},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, decoder_sparse_step=1)
    vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_heads=2,
                  patch_size=QWEN3_VL_VIDEO_PROCESSOR["patch_size"],
                  spatial_merge_size=QWEN3_VL_VIDEO_PROCESSOR["merge_size"],
                  temporal_patch_size=QWEN3_VL_VIDEO_PROCESSOR["temporal_patch_size"],
                  out_hidden_size=hidden_size, num_position_embeddings=64,
                  deepstack_visual_indexes=list(deepstack_visual_indexes))
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _save_qwen3_vl(path: Path, family: str, *, seed: int, preprocessor: dict | None, **config_kwargs) -> Path:
    """Weights + config, and the processor files a Qwen3-VL repo ships: tokenizer, chat template, (video) processor."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    moe = family == "qwen3_vl_moe"
    tokenizer = build_qwen3_vl_tokenizer()
    config = qwen3_vl_tiny_config(tokenizer, moe=moe, **config_kwargs)
    torch.manual_seed(seed)
    model = (Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration)(config).eval()
    _widen_random_init(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # with chat_template.jinja, which the tokenizer and processor both read
    write_qwen3_vl_processor_files(path, preprocessor)
    return path


# --- Qwen3.5 (hybrid: Gated DeltaNet linear-attention layers + full-attention layers) ---------------------------

# Qwen3.5 checkpoints ship the Qwen3-VL processor (processor_class "Qwen3VLProcessor", the same video processor
# config) and a template of the Qwen3-VL structure whose generation prompt opens a thinking block: `<think>\n`
# after `<|im_start|>assistant\n`, or an empty block `<think>\n\n</think>\n\n` with `enable_thinking=False`.
# This is that template rebuilt on QWEN3_VL_CHAT_TEMPLATE (not a verbatim copy of a released file: no machine
# here reaches the hub); the part the engine depends on, the video block and the generation prompt, is the one
# the Qwen3.5 model card documents.
_QWEN3_VL_GENERATION_PROMPT = """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3_5_CHAT_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE.replace(_QWEN3_VL_GENERATION_PROMPT, """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}
""")
assert QWEN3_5_CHAT_TEMPLATE != QWEN3_VL_CHAT_TEMPLATE


def qwen3_5_tiny_config(tokenizer, *, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
                        num_kv_heads: int = 2, layer_types: list[str] | None = None, vision_depth: int = 2,
                        vision_dim: int = 32, moe: bool = False):
    """A Qwen3.5 config for CPU tests: 3 Gated DeltaNet layers then 1 gated full-attention layer (the release's
    3:1 interleave), GQA, partial interleaved M-RoPE, patch 16, no DeepStack. `moe`: Qwen3.5-MoE (4 experts, 2 per
    token, plus the shared expert)."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    head_dim = hidden_size // num_heads
    rotary = head_dim // 2  # partial_rotary_factor 0.5: rotary dims per head
    half = rotary // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]  # sums to the rotary half
    if layer_types is None:
        layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(num_layers)]
    ids = vision_token_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, layer_types=list(layer_types), linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": mrope_section,
                         "mrope_interleaved": True, "partial_rotary_factor": rotary / head_dim},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size,
                    shared_expert_intermediate_size=hidden_size)
        text.pop("intermediate_size")
    vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_heads=2,
                  patch_size=QWEN3_VL_VIDEO_PROCESSOR["patch_size"],
                  spatial_merge_size=QWEN3_VL_VIDEO_PROCESSOR["merge_size"],
                  temporal_patch_size=QWEN3_VL_VIDEO_PROCESSOR["temporal_patch_size"],
                  out_hidden_size=hidden_size, num_position_embeddings=64)
    cls = Qwen3_5MoeConfig if moe else Qwen3_5Config
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _save_qwen3_5(path: Path, family: str, *, seed: int, preprocessor: dict | None, **config_kwargs) -> Path:
    """Weights + config, the Qwen3-VL processor files and the Qwen3.5 chat template."""
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    moe = family == "qwen3_5_moe"
    tokenizer = build_qwen3_vl_tokenizer()
    tokenizer.chat_template = QWEN3_5_CHAT_TEMPLATE
    config = qwen3_5_tiny_config(tokenizer, moe=moe, **config_kwargs)
    torch.manual_seed(seed)
    model = (Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration)(config).eval()
    _widen_random_init(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_qwen3_vl_processor_files(path, preprocessor)
    return path


# model_type -> builder(path, model_type, *, seed, preprocessor, **config_kwargs) of a tiny random checkpoint of that
# family, one line per family: tests parametrised over the adapters registry (tests/statekv/test_families.py) need
# one entry per family in statekv.models.ADAPTERS.
TINY_CHECKPOINTS = {
    "qwen2_vl": _save_qwen2,
    "qwen2_5_vl": _save_qwen2,
    "qwen3_vl": _save_qwen3_vl,
    "qwen3_vl_moe": _save_qwen3_vl,
    "qwen3_5": _save_qwen3_5,
    "qwen3_5_moe": _save_qwen3_5,
}


# InternVL3 and LLaVA-OneVision (1-D RoPE, one frame per chunk): statekv/testing/tiny_1d.py
TINY_CHECKPOINTS.update({"internvl": save_tiny_internvl, "llava_onevision": save_tiny_llava_onevision})


def save_family_checkpoint(path: str | os.PathLike, model_type: str, **kwargs) -> Path:
    """A tiny random checkpoint of the family with this `model_type` (see `TINY_CHECKPOINTS`)."""
    return save_tiny_checkpoint(path, model_type, **kwargs)
