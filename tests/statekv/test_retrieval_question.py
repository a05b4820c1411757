"""ReKV's published query (`TopK(query="question")`) against an independent implementation of its rule.

ReKV (Becomebright/ReKV, model/attention/kv_cache_manager.py `_calc_block_topk`, `_append_global`) scores each
block per layer by the dot product of the *bare question's* mean query and the block's mean key, both taken
*before* the rotary embedding, in a pass over the question whose KV is discarded; each layer's query comes from
hidden states that already attended to the blocks the layers below chose. The reference here rebuilds that from
the plain transformers model alone: its own forward over the whole sequence gives the video's K/V (post-RoPE, for
the chosen context) and, through hooks on `k_proj` / `q_proj`, the keys and queries before RoPE; the bare question
is then run layer by layer over a DynamicCache of [prefix | the chunks chosen below], choosing at each layer with
a plain loop (chunk means, dot products, top-k). Nothing of statekv's scoring, un-rotation or decoder is used
(only its chunk boundaries and the question's position after the video, which the plain model's own positions
confirm).
"""

from __future__ import annotations

import pytest
import torch

import statekv.decoding
from statekv import Engine, Full
from statekv.retrieval import RetrievalContext, TopK
from statekv.testing.checkpoints import save_family_checkpoint
from statekv.testing.reference import model_forward, reference_model
from statekv.testing.reference_inputs import reference_inputs
from statekv.testing.selection import capture_decoder_inputs
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

QUESTION = "What happens after the dog enters?"
SMALL = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)
CASES = {  # family -> (frames, height, width): one M-RoPE Qwen, one 1-D family; 8 chunks each
    "qwen2_vl": (16, 56, 84),
    "internvl": (8, 60, 90),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def setup(request, tmp_path_factory):
    family = request.param
    path = str(save_family_checkpoint(tmp_path_factory.mktemp("rekv") / family, family))
    engine = Engine.from_pretrained(path, policy=Full(), device="cpu", dtype=torch.float32, sampling=SMALL)
    n, h, w = CASES[family]
    frames = synthetic_frames(n, h, w, seed=11)
    return family, path, engine, frames, engine.prefill(frames, fps=2.0)


class Recording(RetrievalContext):
    """statekv's retrieval context, remembered so a test can read what each layer chose."""

    made: list[RetrievalContext] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Recording.made.append(self)


def statekv_selection(engine, cache, retrieval, monkeypatch) -> dict[int, list[int]]:
    Recording.made = []
    monkeypatch.setattr(statekv.decoding, "RetrievalContext", Recording)
    engine.ask(cache, QUESTION, max_new_tokens=1, retrieval=retrieval)
    (ctx,) = Recording.made
    return ctx.selected


def _projections(model, names):
    """Hooks that record each attention layer's `names` projection outputs (pre-RoPE, pre-reshape)."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        for name in names:
            def hook(module, args, out, key=(name, i)):
                seen[key] = out.detach().clone()
            handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    return seen, handles


@torch.inference_mode()
def reference_rekv(path, engine, cache, frames, k, *, sign=1.0, post_rope=False) -> dict[int, list[int]]:
    """ReKV's rule, written out on the plain transformers model (see the module docstring). `sign=-1` or
    `post_rope=True` are the wrong rules the test must tell apart."""
    from transformers import DynamicCache

    model = reference_model(path)
    text = model.config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    inputs = reference_inputs(engine.adapter, frames, QUESTION, "prefix-first", cache.video.frame_size,
                              cache.video.sampled_fps)
    embeds, positions = capture_decoder_inputs(model, inputs)
    seen, handles = _projections(model, ["k_proj"])
    try:
        out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    full = out.past_key_values
    lo = cache.prefix_len
    spans = []
    for c in cache.chunks:
        spans.append((lo, lo + c.num_tokens))
        lo += c.num_tokens
    start = int(positions[..., lo].flatten()[0])  # the first text position after the video
    assert (positions[..., lo] == start).all()
    layers = text.num_hidden_layers
    summaries = []
    for layer in range(layers):
        keys = (full.layers[layer].keys[0].transpose(0, 1) if post_rope else
                seen[("k_proj", layer)][0].view(-1, kv_heads, dim))  # (L, Hkv, D)
        summaries.append(torch.stack([keys[a:b].float().mean(0) for a, b in spans]))  # (C, Hkv, D)

    ids = torch.tensor([engine.adapter.text_ids(QUESTION)])
    q_len = ids.shape[1]
    q_pos = torch.arange(start, start + q_len).view(1, 1, -1).expand(positions.shape[0], 1, -1) \
        if positions.dim() == 3 else torch.arange(start, start + q_len).view(1, -1)
    q_embeds = model.get_input_embeddings()(ids)
    prefix = cache.prefix_len
    chosen: dict[int, list[int]] = {}
    for layer in range(layers):
        data = []
        for j in range(layers):
            kj, vj = full.layers[j].keys, full.layers[j].values
            parts = [(0, prefix)] + ([spans[i] for i in chosen[j]] if j in chosen else [])
            data.append((torch.cat([kj[:, :, a:b] for a, b in parts], 2),
                         torch.cat([vj[:, :, a:b] for a, b in parts], 2)))
        seen, handles = _projections(model, ["q_proj"])
        try:
            run_layers(model, q_embeds, q_pos, DynamicCache(ddp_cache_data=data, config=model.config), layer + 1)
        finally:
            for h in handles:
                h.remove()
        q = seen[("q_proj", layer)][0].view(q_len, heads, dim).float()  # (n, H, D), before RoPE
        if post_rope:
            cos, sin = model.model.language_model.rotary_emb(q, q_pos)
            cos, sin = cos[0][:, None].float(), sin[0][:, None].float()
            q = q * cos + torch.cat([-q[..., dim // 2:], q[..., :dim // 2]], -1) * sin
        mean_q = q.mean(0).reshape(-1)  # (H * D): every query head
        group = heads // kv_heads
        scores = []
        for s in summaries[layer]:  # (Hkv, D): each KV head's key serves the query heads of its group
            block = s.repeat_interleave(group, dim=0).reshape(-1)
            scores.append(sign * float(mean_q @ block))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        chosen[layer] = sorted(order[:k])
    return chosen


def run_layers(model, embeds, positions, cache, count):
    """The text stack's first `count` decoder layers over `embeds`, each layer attending to its own cache entry
    (their lengths differ: each layer holds the chunks it chose) and causally to these tokens."""
    lm = model.model.language_model
    hidden = embeds
    rope = lm.rotary_emb(hidden, positions)
    q = embeds.shape[1]
    for j, layer in enumerate(lm.layers[:count]):
        past = cache.layers[j].keys.shape[2]
        mask = torch.ones(q, past + q, dtype=torch.bool)
        mask[:, past:] = torch.ones(q, q, dtype=torch.bool).tril()
        hidden = layer(hidden, attention_mask=mask[None, None], position_ids=positions, cache=cache,
                       use_cache=True, position_embeddings=rope)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden


@pytest.mark.parametrize("k", [2, 3])
def test_question_query_chooses_as_rekv_does(setup, k, monkeypatch):
    family, path, engine, frames, cache = setup
    assert cache.num_chunks == 8
    got = statekv_selection(engine, cache, TopK(k=k, query="question"), monkeypatch)
    want = reference_rekv(path, engine, cache, frames, k)
    assert got == want


def test_the_reference_tells_the_wrong_rules_apart(setup, monkeypatch):
    """The comparison above can fail: the reversed score and post-RoPE keys choose other chunks here, and so does
    today's rule (the whole prompt, after RoPE)."""
    family, path, engine, frames, cache = setup
    got = statekv_selection(engine, cache, TopK(k=2, query="question"), monkeypatch)
    assert got != reference_rekv(path, engine, cache, frames, 2, sign=-1.0)
    assert got != reference_rekv(path, engine, cache, frames, 2, post_rope=True)
    assert got != statekv_selection(engine, cache, TopK(k=2), monkeypatch)


def test_question_query_over_every_chunk_is_full_attention(setup):
    family, path, engine, frames, cache = setup
    full = engine.ask(cache, QUESTION, max_new_tokens=4, output_scores=True)
    for r in (TopK(k=cache.num_chunks, query="question"),
              TopK(k=3, query="question", adaptive_budget=True, recent=cache.num_chunks)):
        got = engine.ask(cache, QUESTION, max_new_tokens=4, output_scores=True, retrieval=r)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(full.scores), rtol=0, atol=1e-5)
        assert got.token_ids == full.token_ids


def stored(engine, cache, uri, *, pre_rope=True):
    """`cache` written to `uri` as a store writes it (`pre_rope=False`: as caches were written before pre-RoPE
    summary keys existed)."""
    from dataclasses import replace

    from statekv.store import save_cache

    if not pre_rope:
        cache = replace(cache, chunks=[replace(c, pre_rope_summaries=None) for c in cache.chunks])
    save_cache(cache, uri)
    return uri


def test_a_stored_cache_is_scored_from_its_summaries_file(setup, tmp_path, monkeypatch):
    """The pre-RoPE summary keys are written at prefill: a lazily loaded cache chooses as the in-memory one does and
    reads no more than the prompt's rule (summaries, then the chosen chunks' layers), far less than the video."""
    from statekv.eval import ReadMeter
    from statekv.store import load_cache
    from statekv.store.fs import resolve

    family, path, engine, frames, cache = setup
    uri = stored(engine, cache, str(tmp_path / "clip"))
    fs, _ = resolve(uri)

    def read(retrieval):
        meter = ReadMeter(fs)
        lazy = load_cache(uri, filesystem=meter)
        chosen = statekv_selection(engine, lazy, retrieval, monkeypatch)
        return chosen, meter.bytes_read, lazy

    chosen, question_bytes, lazy = read(TopK(k=2, query="question"))
    assert chosen == statekv_selection(engine, cache, TopK(k=2, query="question"), monkeypatch)
    assert lazy.chunks.loaded == []  # no chunk read whole
    _, prompt_bytes, _ = read(TopK(k=2))
    _, full_bytes, _ = read(TopK(k=cache.num_chunks))
    assert question_bytes <= 1.1 * prompt_bytes < full_bytes, (question_bytes, prompt_bytes, full_bytes)


def test_an_old_cache_names_itself_and_the_fix(setup, tmp_path):
    from statekv.store import load_cache

    family, path, engine, frames, cache = setup
    uri = stored(engine, cache, str(tmp_path / "old"), pre_rope=False)
    old = load_cache(uri)
    engine.ask(old, QUESTION, max_new_tokens=1, retrieval=TopK(k=2))  # today's rule still answers
    with pytest.raises(ValueError) as info:
        engine.ask(old, QUESTION, max_new_tokens=1, retrieval=TopK(k=2, query="question"))
    message = str(info.value)
    assert "\n" not in message and uri in message and "re-index" in message and "pre-RoPE" in message


@torch.inference_mode()
def test_pre_rope_summaries_are_the_plain_models_keys_before_rope(family_checkpoint):
    """Every family (M-RoPE sections, interleaved M-RoPE, 1-D, Qwen3.5's partial rotary on its attention layers):
    the chunk summaries the engine writes at prefill equal the means of the keys the plain transformers model has
    before its rotary embedding (captured after `k_proj`, and after `k_norm` where the family normalises keys)."""
    engine = Engine.from_pretrained(family_checkpoint, policy=Full(), device="cpu", dtype=torch.float32,
                                    sampling=SMALL)
    frames = synthetic_frames(4, 56, 84, seed=3)
    cache = engine.prefill(frames, fps=2.0)
    model = reference_model(family_checkpoint)
    text = model.config.get_text_config()
    kv_heads = text.num_key_value_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:  # a linear-attention layer
            continue
        module = getattr(attn, "k_norm", None) or attn.k_proj

        def hook(m, args, out, i=i):
            seen[i] = out.detach().reshape(out.shape[1], kv_heads, dim).clone()  # (L, Hkv, D)
        handles.append(module.register_forward_hook(hook))
    inputs = reference_inputs(engine.adapter, frames, QUESTION, "prefix-first", cache.video.frame_size,
                              cache.video.sampled_fps)
    try:
        model_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    assert seen and set(seen) == set(engine.adapter.layout.attention_layers)
    lo = cache.prefix_len
    for c in cache.chunks:
        for layer, keys in seen.items():
            want = keys[lo:lo + c.num_tokens].float().mean(0)  # (Hkv, D)
            torch.testing.assert_close(c.pre_rope_summaries[layer], want, rtol=0, atol=2e-5)
            post = c.keys[layer].float().mean(1)
            assert (post - want).abs().max() > 1e-3  # RoPE moved them: the check is not trivially true
        lo += c.num_tokens
