"""An independent re-implementation of the StateKV selection rule on an eager-attention copy of the model.

Nothing of statekv's engine, attention op or policies is used: the plain transformers model itself builds the
embeddings and positions of the whole sequence (captured at the input of its language model during one forward
over `statekv.testing.reference_inputs`), and the streaming is replayed chunk by chunk with transformers' eager
attention and `output_attentions=True`: per layer, the chunk's attention probabilities are summed over its queries and over
the query heads of each KV group, the top-`capacity` keys of [carried state | chunk] per layer and KV head are
kept, in temporal order. Returns the token indices carried after every chunk. In hybrid stacks (Qwen3.5) the
linear-attention layers run on transformers' own cache layers, carried from chunk to chunk as they are; only the
attention layers are selected.
"""

from __future__ import annotations

from typing import Any

import torch

from statekv.testing.reference import model_forward


def capture_decoder_inputs(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds (1, L, hidden), position_ids (..., L)) the model gives its language model for `inputs`."""
    return _capture(model, inputs)[:2]


def _capture(model: Any, inputs: dict[str, Any]):
    """Also Qwen3-VL's DeepStack inputs: (visual_pos_masks (1, L), [(visual tokens, hidden)] per layer) or None."""
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
        seen["positions"] = _positions(kwargs)
        seen["mask"] = kwargs.get("visual_pos_masks")
        seen["deepstack"] = kwargs.get("deepstack_visual_embeds")

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model_forward(model, inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"], seen["mask"], seen["deepstack"]


def _deepstack_slice(mask: Any, deepstack: Any, lo: int, n: int) -> dict[str, Any]:
    """DeepStack decoder kwargs of tokens [lo, lo + n): their visual mask and their rows of each layer's features."""
    if mask is None or deepstack is None:
        return {}
    first, count = int(mask[0, :lo].sum()), int(mask[0, lo:lo + n].sum())
    if count == 0:
        return {}
    return {"visual_pos_masks": mask[:, lo:lo + n],
            "deepstack_visual_embeds": [d[first:first + count] for d in deepstack]}


def _positions(kwargs: dict[str, Any]) -> torch.Tensor:
    """The language model's position_ids; a model that passes none (InternVL, LLaVA-OneVision: 1-D RoPE) has its
    text stack count them from 0, as here."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"].detach().clone()
    return torch.arange(kwargs["inputs_embeds"].shape[1], device=kwargs["inputs_embeds"].device).view(1, -1)


@torch.inference_mode()
def reference_selection(model: Any, inputs: dict[str, Any], prefix_len: int, chunk_tokens: list[int],
                        capacity: int) -> list[list[torch.Tensor]]:
    """[chunk][attention layer] -> (Hkv, S) int64 token indices (among the video's tokens) carried after that chunk.

    `model` must use eager attention for its text stack. `chunk_tokens` gives the chunk boundaries (the family's
    chunk layout); the selection itself is recomputed here from the model's attention probabilities.
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    embeds, positions, mask, deepstack = _capture(model, inputs)
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    group = heads // kv_heads
    linear = [i for i, kind in enumerate(getattr(text, "layer_types", None) or []) if kind == "linear_attention"]
    attention = [i for i in range(text.num_hidden_layers) if i not in linear]

    prefix = DynamicCache(config=model.config)
    if prefix_len:
        lm(inputs_embeds=embeds[:, :prefix_len], position_ids=positions[..., :prefix_len], cache=prefix,
           use_cache=True)
    prefix_kv = [None if i in linear else (layer.keys, layer.values)
                 for i, layer in enumerate(prefix.layers)] if prefix_len else None
    running = prefix  # holds the linear layers' transformers cache layers, updated in place chunk after chunk
    state: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * text.num_hidden_layers
    out_indices: list[list[torch.Tensor]] = []
    lo = prefix_len
    first_token = 0
    for n in chunk_tokens:
        data = []
        for layer, s in enumerate(state):
            if layer in linear:
                data.append((None, None))
                continue
            keys = [prefix_kv[layer][0]] if prefix_kv else []
            values = [prefix_kv[layer][1]] if prefix_kv else []
            if s is not None:
                keys.append(s[0])
                values.append(s[1])
            data.append((torch.cat(keys, 2), torch.cat(values, 2)) if keys else None)
        dyn = DynamicCache(ddp_cache_data=data, config=model.config) if all(d is not None for d in data) \
            else DynamicCache(config=model.config)
        for layer in linear:
            dyn.layers[layer] = running.layers[layer]
        running = dyn
        out = lm(inputs_embeds=embeds[:, lo:lo + n], position_ids=positions[..., lo:lo + n], cache=dyn,
                 use_cache=True, output_attentions=True, **_deepstack_slice(mask, deepstack, lo, n))
        chosen = []
        for position, layer in enumerate(attention):
            probs = out.attentions[position][0].float()  # (H, n, P + S + n)
            mass = probs.sum(1).view(kv_heads, group, -1).sum(1)[:, prefix_len:]  # (Hkv, S + n)
            keys = dyn.layers[layer].keys[:, :, prefix_len:]  # (1, Hkv, S + n, D): [state | chunk]
            values = dyn.layers[layer].values[:, :, prefix_len:]
            new = torch.arange(first_token, first_token + n).expand(kv_heads, -1)
            index = new if state[layer] is None else torch.cat([state[layer][2], new], 1)  # (Hkv, S + n)
            if index.shape[1] > capacity:
                top = mass.topk(capacity, dim=1).indices.sort(dim=1).values  # (Hkv, capacity)
                gather = top.view(1, kv_heads, -1, 1).expand(1, -1, -1, keys.shape[-1])
                keys, values, index = keys.gather(2, gather), values.gather(2, gather), index.gather(1, top)
            state[layer] = (keys, values, index)
            chosen.append(index.clone())
        out_indices.append(chosen)
        lo += n
        first_token += n
    return out_indices
