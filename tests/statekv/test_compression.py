"""Write-time guidance-prompt compression (StreamKV, statekv/compression.py): what it keeps, what it stores, what
it leaves alone, and the store's compressed chunk rows (local and loopback S3)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from statekv import Engine, Full, StateKV
from statekv.compression import Guided, make_compression, top_tokens
from statekv.errors import PrefillConfigMismatchError
from statekv.retrieval import TopK
from statekv.store import CacheCorruptError, load_cache, prefill_to_store, save_cache
from statekv.store import manifest as schema
from statekv.store.describe import format_manifest
from statekv.store.fs import resolve
from statekv.testing.reference import check_against_transformers, model_forward, reference_model
from statekv.testing.reference_inputs import reference_inputs
from statekv.testing.videos import synthetic_frames
from statekv.video import SamplingConfig

# 112x168 frames: a 8x12 patch grid, 24 LLM tokens per chunk (two frames)
SAMPLING = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=112 * 168)
FPS = 2.0
PROMPT = "What is happening in this video?"
QUESTION = "What happens after the dog enters?"


def make_engine(path: str, policy=None, **kwargs) -> Engine:
    return Engine.from_pretrained(path, policy=policy or Full(), device="cpu", dtype=torch.float32,
                                  sampling=SAMPLING, **kwargs)


@pytest.fixture(scope="module")
def path(tiny_checkpoints) -> str:
    return tiny_checkpoints["qwen2_5_vl"]


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return synthetic_frames(8, 112, 168, seed=4)  # 4 chunks of 24 tokens


@pytest.fixture(scope="module")
def full_cache(path, frames):
    return make_engine(path).prefill(frames, fps=FPS)


@pytest.fixture(scope="module")
def guided_engine(path):
    return make_engine(path, compression=Guided(prompt=PROMPT, keep=0.25))


@pytest.fixture(scope="module")
def guided_cache(guided_engine, frames):
    return guided_engine.prefill(frames, fps=FPS)


def test_keep_everything_stores_exactly_what_full_stores_and_equals_the_plain_model(path, frames, full_cache):
    """keep=1.0: every chunk's K/V bit-identical to Full's, and (check_against_transformers) equal to one forward
    of the plain transformers model; answers identical."""
    engine = make_engine(path, compression=Guided(prompt=PROMPT, keep=1.0))
    cache = engine.prefill(frames, fps=FPS)
    for a, b in zip(full_cache.chunks, cache.chunks):
        for layer in range(len(a.keys)):
            assert torch.equal(a.keys[layer], b.keys[layer]) and torch.equal(a.values[layer], b.values[layer])
            assert torch.equal(b.kept[layer], torch.arange(a.num_tokens))
    report = check_against_transformers(path, frames, fps=FPS, sampling=SAMPLING, layout="prefix-first",
                                        engine=engine)
    report.assert_exact(1e-4)


def reference_kept(model, adapter, cache, frames, upto: int, target: int, keep: float) -> list[torch.Tensor]:
    """Per layer, the kept tokens of chunk `target` by an eager forward of the plain model over [prefix, chunks
    0..upto, guidance prompt]: the guidance rows' attention on the target chunk's keys, summed over rows and
    heads, top ceil(keep · n) in order. Asserts that the top set is not the bottom set (so a reversed mutant fails)."""
    inputs = reference_inputs(adapter, frames[:cache.chunks[upto].frame_range[1]], PROMPT, "prefix-first",
                                      cache.video.frame_size, cache.video.sampled_fps)
    attentions = model_forward(model, inputs, output_attentions=True).attentions
    guidance = adapter.answer_inputs(PROMPT, cache.cursor, "prefix-first").embeds.shape[0]
    start = cache.prefix_len + sum(cache.chunk_tokens[:target])
    n = cache.chunk_tokens[target]
    assert inputs["input_ids"].shape[1] == cache.prefix_len + sum(cache.chunk_tokens[:upto + 1]) + guidance
    m = Guided(keep=keep).kept_count(n)
    out = []
    for att in attentions:  # (1, H, L, L) per layer
        mass = att[0, :, -guidance:, start:start + n].sum(dim=(0, 1))  # (n,)
        top = torch.sort(torch.topk(mass, m).indices).values
        assert not torch.equal(top, torch.sort(torch.topk(-mass, m).indices).values)
        out.append(top)
    return out


@torch.inference_mode()
def test_kept_tokens_are_those_the_guidance_prompt_attends_to_most_in_the_plain_model(path, frames, guided_engine,
                                                                                      guided_cache):
    """Independent computation (`reference_kept`: the plain transformers model, eager attention, output_attentions).
    One chunk per step: the guidance prompt follows each chunk. Two chunks per step: it follows the step's second
    chunk, and both chunks are ranked from that one pass. A mutant keeping the lowest-scoring tokens fails."""
    model = reference_model(path, attn_implementation="eager")
    a = guided_engine.adapter
    assert Guided(keep=0.25).kept_count(24) == 6
    for c in (0, guided_cache.num_chunks - 1):  # the first chunk and one that attends to earlier chunks
        chunk = guided_cache.chunks[c]
        for layer, want in enumerate(reference_kept(model, a, guided_cache, frames, c, c, 0.25)):
            assert torch.equal(chunk.kept[layer], want), (c, layer)
            assert chunk.position_ids[:, chunk.kept[layer]].shape == (3, 6)  # original positions of the kept keys
    steps = make_engine(path, compression=Guided(prompt=PROMPT, keep=0.25), chunks_per_step=2).prefill(frames, fps=FPS)
    last = steps.num_chunks - 1
    for target in (last - 1, last):  # the last step's two chunks
        for layer, want in enumerate(reference_kept(model, a, steps, frames, last, target, 0.25)):
            assert torch.equal(steps.chunks[target].kept[layer], want), (target, layer)


def test_the_stored_kv_shrinks_to_the_kept_fraction(full_cache, guided_cache, tmp_path):
    for a, b in zip(full_cache.chunks, guided_cache.chunks):
        assert b.num_tokens == a.num_tokens == 24 and b.timestamps == a.timestamps  # chunks stay chunks
        for layer in range(len(a.keys)):
            assert b.keys[layer].shape == (a.keys[layer].shape[0], 6, a.keys[layer].shape[2])
            assert torch.equal(b.keys[layer], a.keys[layer][:, b.kept[layer]])  # original (rotated) keys
            assert torch.equal(b.values[layer], a.values[layer][:, b.kept[layer]])
        assert b.nbytes * 4 == a.nbytes
    sizes = {}
    for name, cache in (("full", full_cache), ("guided", guided_cache)):
        manifest = save_cache(cache, str(tmp_path / name))
        sizes[name] = sum(f["bytes"] for f in manifest["files"] if f["kind"] == "chunks")
    kv = sum(c.nbytes for c in full_cache.chunks)
    saved = sizes["full"] - sizes["guided"]
    cells = full_cache.num_chunks * 2  # (chunk, layer) cells, each with one more column: the kept indices
    print(f"chunk files: full {sizes['full']} B, guided(0.25) {sizes['guided']} B; K/V {kv} B, saved {saved} B")
    # what is saved is the dropped 3/4 of the K/V, less the kept indices (6 int64), their page headers and footer
    # entries (< 128 B per column chunk): one token more or less per layer would be 1/24 of the K/V off
    assert 0.75 * kv - cells * (6 * 8 + 128) <= saved <= 0.75 * kv


def test_compression_leaves_the_carried_state_and_the_prefill_alone(path, frames):
    """The next step's policy sees the full step: state and the stored tokens' K/V equal an uncompressed run's."""
    policy = StateKV(capacity=16)
    plain = make_engine(path, policy).prefill(frames, fps=FPS)
    guided = make_engine(path, policy, compression=Guided(keep=0.5)).prefill(frames, fps=FPS)
    for s, t in zip(plain.state, guided.state):
        assert torch.equal(s.keys, t.keys) and torch.equal(s.token_index, t.token_index)
    for a, b in zip(plain.chunks, guided.chunks):
        for layer in range(len(a.keys)):
            assert torch.equal(b.keys[layer], a.keys[layer][:, b.kept[layer]])
    assert guided.cursor == plain.cursor and guided.chunk_tokens == plain.chunk_tokens


@pytest.mark.parametrize("int8", [False, True])
def test_a_stored_guided_cache_reloads_equal_and_answers_like_the_in_memory_one(guided_engine, guided_cache,
                                                                                store_root, int8):
    root, options = store_root
    uri = f"{root}/guided"
    manifest = save_cache(guided_cache, uri, int8=int8, storage_options=options)
    assert manifest["prefill"]["compression"] == Guided(prompt=PROMPT, keep=0.25).settings()
    assert manifest["chunks"]["kept_tokens"] == [6 * guided_cache.num_chunks] * 2
    assert ("stored:   guided (prompt='What is happening in this video?', keep=0.25): 24 of 96 video tokens per "
            "layer") in format_manifest(uri, manifest).splitlines()  # what `statekv inspect` prints
    eager = load_cache(uri, lazy=False, storage_options=options)
    lazy = load_cache(uri, storage_options=options)
    assert eager.config == guided_cache.config
    for loaded in (eager, lazy):
        for a, b in zip(guided_cache.chunks, loaded.chunks):
            for layer in range(len(a.keys)):
                assert torch.equal(a.kept[layer], b.kept[layer])
                if int8:
                    torch.testing.assert_close(b.keys[layer], a.keys[layer], atol=0.05, rtol=0.05)
                else:
                    assert torch.equal(a.keys[layer], b.keys[layer]) and torch.equal(a.values[layer], b.values[layer])
    if int8:
        return
    want = guided_engine.ask(guided_cache, QUESTION, max_new_tokens=4, output_scores=True)
    for loaded in (eager, load_cache(uri, storage_options=options)):
        got = guided_engine.ask(loaded, QUESTION, max_new_tokens=4, output_scores=True)
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=0, atol=1e-5)


def test_retrieval_over_a_guided_cache_scores_the_mean_of_the_kept_keys(guided_engine, guided_cache, store_root):
    """TopK over a stored (lazy) guided cache answers as over the in-memory one; with k >= all chunks it is the
    plain answer; summary keys are the mean of the kept keys; evidence keeps each chunk's time range."""
    root, options = store_root
    uri = f"{root}/guided-rt"
    prefill_to_store(guided_engine, synthetic_frames(8, 112, 168, seed=4), uri, fps=FPS, storage_options=options)
    stored = load_cache(uri, storage_options=options)
    for layer in range(2):
        means = torch.stack([c.keys[layer].float().mean(dim=1) for c in guided_cache.chunks])
        torch.testing.assert_close(stored.chunks.summary_keys(layer), means, rtol=0, atol=1e-6)
    plain = guided_engine.ask(guided_cache, QUESTION, max_new_tokens=3, output_scores=True)
    every = guided_engine.ask(guided_cache, QUESTION, max_new_tokens=3, output_scores=True,
                              retrieval=TopK(k=guided_cache.num_chunks))
    torch.testing.assert_close(torch.stack(every.scores), torch.stack(plain.scores), rtol=0, atol=1e-5)
    few = TopK(k=1, recent=1)
    mem = guided_engine.ask(guided_cache, QUESTION, max_new_tokens=3, output_scores=True, retrieval=few)
    got = guided_engine.ask(stored, QUESTION, max_new_tokens=3, output_scores=True, retrieval=few)
    assert got.token_ids == mem.token_ids and [e.chunk for e in got.evidence] == [e.chunk for e in mem.evidence]
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(mem.scores), rtol=0, atol=1e-5)
    for e in got.evidence:
        c = guided_cache.chunks[e.chunk]
        assert e.start_s == c.timestamps[0] and e.end_s == pytest.approx(c.timestamps[-1] + 1 / FPS)


def test_resuming_continues_the_compression_and_refuses_another_setting(path, frames, guided_engine, guided_cache):
    first = guided_engine.prefill(frames[:4], fps=FPS)
    resumed = guided_engine.prefill(frames[4:], fps=FPS, resume_from=first)
    for a, b in zip(guided_cache.chunks, resumed.chunks):
        for layer in range(len(a.keys)):
            assert torch.equal(a.kept[layer], b.kept[layer]) and torch.equal(a.keys[layer], b.keys[layer])
    for other, field in ((make_engine(path, compression=Guided(prompt=PROMPT, keep=0.5)), "compression.keep"),
                         (make_engine(path), "compression")):
        with pytest.raises(PrefillConfigMismatchError, match=field.replace(".", r"\.")):
            other.prefill(frames[4:], fps=FPS, resume_from=first)


def _tamper(uri: str, change) -> None:
    fs, path = resolve(uri)
    m = json.loads(fs.cat_file(f"{path}/manifest.json"))
    change(m)
    fs.pipe_file(f"{path}/manifest.json", schema.encode(schema.seal(m)))


@pytest.mark.parametrize("change, field", [
    (lambda m: m["chunks"].pop("kept_tokens"), "chunks.kept_tokens"),
    (lambda m: m["prefill"].update(compression=None), "chunks.kept_tokens"),
    (lambda m: m["chunks"]["kept_tokens"].pop(), "chunks.kept_tokens"),
    (lambda m: m["chunks"]["kept_tokens"].__setitem__(0, 10 ** 6), r"chunks.kept_tokens\[0\]"),
    (lambda m: m["chunks"]["kept_tokens"].__setitem__(1, m["chunks"]["kept_tokens"][1] - 1),
     r"chunks.kept_tokens\[1\]"),
    (lambda m: m["prefill"]["compression"].update(name="other"), "prefill.compression.name"),
])
def test_a_manifest_disagreeing_about_compression_is_refused_naming_the_field(guided_cache, tmp_path, change, field):
    uri = str(tmp_path / "vid")
    save_cache(guided_cache, uri)
    _tamper(uri, change)
    with pytest.raises(CacheCorruptError, match=field):
        load_cache(uri, lazy=False)


def test_the_writer_refuses_mixing_compressed_and_plain_chunks(full_cache, guided_cache, tmp_path):
    mixed = dataclasses.replace(guided_cache, chunks=[guided_cache.chunks[0], *full_cache.chunks[1:]])
    with pytest.raises(ValueError, match="chunk 1 is not compressed"):
        save_cache(mixed, str(tmp_path / "mixed"))
    plain_config = dataclasses.replace(guided_cache, config=full_cache.config)
    with pytest.raises(ValueError, match="compresses none"):
        save_cache(plain_config, str(tmp_path / "unrecorded"))


def test_settings_are_checked_and_round_trip():
    g = Guided(prompt="Who is there?", keep=0.3)
    assert make_compression(g.settings()) == g and make_compression(None) is None
    assert [Guided(keep=k).kept_count(24) for k in (0.01, 0.25, 0.6, 1.0)] == [1, 6, 15, 24]
    for keep in (0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="keep must be a fraction"):
            Guided(keep=keep)
    with pytest.raises(ValueError, match="unknown compression"):
        make_compression({"name": "nope"})
    assert torch.equal(top_tokens(torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0]), 3), torch.tensor([1, 2, 3]))


def test_compression_needs_stored_chunks(path):
    with pytest.raises(ValueError, match="answer_from='state' stores none"):
        make_engine(path, compression=Guided(), answer_from="state")


def test_a_hybrid_model_compresses_its_attention_layers_only(tmp_path_factory, tmp_path):
    """Qwen3.5 (Gated DeltaNet + full attention): linear layers have no K/V to compress and their exact states are
    carried as without compression; the attention layer keeps half of each chunk; store round trip answers equal."""
    from statekv.testing.checkpoints import save_tiny_checkpoint

    ckpt = str(save_tiny_checkpoint(tmp_path_factory.mktemp("qwen3_5") / "tiny", "qwen3_5"))
    frames = synthetic_frames(6, 70, 100, seed=3)
    sampling = SamplingConfig(fps=FPS)

    def engine(**kwargs):
        return Engine.from_pretrained(ckpt, policy=StateKV(capacity=8), device="cpu", dtype=torch.float32,
                                      sampling=sampling, **kwargs)

    plain = engine().prefill(frames, fps=FPS)
    guided_engine = engine(compression=Guided(keep=0.5))
    guided = guided_engine.prefill(frames, fps=FPS)
    linear = guided_engine.adapter.layout.linear_layers
    assert linear and guided.model.linear_layers == list(linear)
    for layer in linear:
        assert torch.equal(guided.recurrent[layer].recurrent, plain.recurrent[layer].recurrent)
        assert torch.equal(guided.recurrent[layer].conv, plain.recurrent[layer].conv)
    for a, b in zip(plain.chunks, guided.chunks):
        for layer in range(len(a.keys)):
            if layer in linear:
                assert b.keys[layer] is None and b.kept[layer] is None
            else:
                assert b.stored_tokens(layer) == Guided(keep=0.5).kept_count(a.num_tokens)
                assert torch.equal(b.keys[layer], a.keys[layer][:, b.kept[layer]])
    uri = str(tmp_path / "hybrid")
    save_cache(guided, uri)
    loaded = load_cache(uri)
    want = guided_engine.ask(guided, QUESTION, max_new_tokens=3, output_scores=True)
    got = guided_engine.ask(loaded, QUESTION, max_new_tokens=3, output_scores=True)
    assert got.token_ids == want.token_ids
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=0, atol=1e-5)


def test_appending_to_a_stored_guided_cache_equals_one_prefill(guided_engine, guided_cache, frames, store_root):
    """prefill_to_store, then resume=True with the rest: the appended chunks are compressed like the first ones, the
    manifest's kept_tokens add up, and the loaded cache equals the one-shot in-memory prefill."""
    root, options = store_root
    uri = f"{root}/appended"
    first = prefill_to_store(guided_engine, frames[:4], uri, fps=FPS, storage_options=options)
    assert first["chunks"]["kept_tokens"] == [12, 12]
    manifest = prefill_to_store(guided_engine, frames[4:], uri, fps=FPS, resume=True, storage_options=options)
    assert manifest["chunks"]["kept_tokens"] == [24, 24] and manifest["chunks"]["count"] == 4
    loaded = load_cache(uri, lazy=False, storage_options=options)
    for a, b in zip(guided_cache.chunks, loaded.chunks):
        for layer in range(len(a.keys)):
            assert torch.equal(a.kept[layer], b.kept[layer]) and torch.equal(a.keys[layer], b.keys[layer])


@pytest.mark.parametrize("bad", [lambda i: i.flip(0), lambda i: i + 100, lambda i: i[:-1]])
def test_the_writer_refuses_kept_indices_that_do_not_describe_the_stored_keys(guided_cache, tmp_path, bad):
    """Descending, out of range, or fewer indices than stored keys: refused before anything is committed."""
    chunk = guided_cache.chunks[1]
    broken = dataclasses.replace(chunk, kept=[bad(chunk.kept[0]), chunk.kept[1]])
    cache = dataclasses.replace(guided_cache, chunks=[guided_cache.chunks[0], broken, *guided_cache.chunks[2:]])
    with pytest.raises(ValueError, match="chunk 1, layer 0: kept token indices"):
        save_cache(cache, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "manifest.json").exists()


@pytest.mark.parametrize("layout", ["prefix-first", "video-first"])
@torch.inference_mode()
def test_every_family_keep_everything_is_full_and_a_guided_cache_survives_the_store(family_checkpoint, layout,
                                                                                    tmp_path):
    """Registry-wide: keep=1 stores bit for bit what Full stores; keep=0.5 stores ceil(n/2) tokens of each chunk
    per attention layer, and answers the same after a store round trip."""
    small = SamplingConfig(fps=2.0, min_pixels=28 * 28, max_pixels=56 * 84)  # fixed-size families ignore it

    def engine(**kwargs):
        return Engine.from_pretrained(family_checkpoint, policy=StateKV(capacity=8), device="cpu",
                                      dtype=torch.float32, sampling=small, layout=layout, **kwargs)

    full = engine()
    video = synthetic_frames(3 * full.adapter.frames_per_chunk, 56, 84, seed=5)
    plain = full.prefill(video, fps=FPS)
    everything = engine(compression=Guided(keep=1.0)).prefill(video, fps=FPS)
    half_engine = engine(compression=Guided(keep=0.5))
    half = half_engine.prefill(video, fps=FPS)
    for a, b, h in zip(plain.chunks, everything.chunks, half.chunks):
        for layer, k in enumerate(a.keys):
            if k is None:  # a linear-attention layer
                continue
            assert torch.equal(b.keys[layer], k) and torch.equal(b.values[layer], a.values[layer])
            assert torch.equal(h.keys[layer], k[:, h.kept[layer]])
            assert h.stored_tokens(layer) == -(-a.num_tokens // 2)
    save_cache(half, str(tmp_path / "c"))
    want = half_engine.ask(half, QUESTION, max_new_tokens=2, output_scores=True)
    got = half_engine.ask(load_cache(str(tmp_path / "c")), QUESTION, max_new_tokens=2, output_scores=True)
    assert got.token_ids == want.token_ids
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=0, atol=1e-5)
