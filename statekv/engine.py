"""The streaming prefill engine: a video in, a `VideoKVCache` out, then any number of questions answered on it.

Family-free: the adapter (statekv/models/base.py) says what a chunk is. Prefill runs the prefix once, then the
video chunk after chunk (`chunks_per_step` chunks per model call; the vision tower on `vision_batch_frames` frames
per call, several steps at once): preprocess -> chunk inputs -> cache
[prefix | carried state] (one preallocated buffer per layer, updated in place: statekv/step_cache.py) -> decode -> policy update per layer and KV head -> split at chunk boundaries -> each
chunk's KV leaves the model's device as soon as it is made, so device memory depends on prefix + capacity + step,
not on video length.

Hybrid stacks (the adapter's `layout.linear_layers`, e.g. Qwen3.5's Gated DeltaNet layers): a linear-attention layer
has no KV; its exact convolution and recurrent states are carried from step to step (streaming them is the same
computation as one pass: nothing is approximated), and the policy, chunk KV and retrieval concern the other
(full-attention) layers only. The states after the prefix and after the last chunk are kept in the cache; answering
starts from a copy of the latter (asking never changes a cache), resuming from the latter.

Answering is handed over to statekv/answering.py (admission, collection) and statekv/decoding.py (the one decode
step): plain questions attend to the video's KV built once on the device and kept in a byte-bounded LRU
(statekv/device_cache.py), shared read-only by every question; retrieval questions to the chunks chosen for them
(statekv/retrieval.py); several questions decode together, one forward per step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np
import torch
import transformers
from transformers import DynamicCache

from statekv.cache import (ChunkKV, ModelInfo, PrefillConfig, RecurrentState, VideoInfo, VideoKVCache,
                           check_answer_from)
from statekv.answering import Answer, TokenEvent, answer_all, stream_answer
from statekv.compression import Guided, compress_step, keep_tokens, make_compression
from statekv.decoding import DEFAULT_SYNC_EVERY, AnswerRequest, BatchDecoder
from statekv.device_cache import DEFAULT_DEVICE_CACHE_BYTES, DeviceCacheLRU, DeviceVideo
from statekv.errors import PrefillConfigMismatchError, VideoError
from statekv.models import LAYOUTS, VideoLMAdapter, load_adapter
from statekv.models.base import unrotate
from statekv.policies import LayerState, Policy, StateKV, make_policy
from statekv.retrieval import Evidence, Retrieval, SegmentRule, SegmentTracker
from statekv.settings import PrefillSettings
from statekv.step_cache import StepCache
from statekv.video import FramesSource, SamplingConfig, VideoSource, iter_frame_batches, open_video
from statekv.video.sampling import resume_timing, sample_source, segment, take_all

logger = logging.getLogger(__name__)

VideoInput = str | os.PathLike | BinaryIO | np.ndarray | VideoSource
ChunkSink = Callable[[ChunkKV], None]
DEFAULT_LAYOUT = "prefix-first"
# frames the vision tower encodes per call (rounded down to whole steps, at least one step). On CPU the tower's
# fixed cost per call was a third of a 64-chunk prefill; batches of 16 frames pay it once per 8 two-frame chunks,
# while holding only 16 decoded frames (a 1080p frame is 6 MB) and their pixels and features at a time.
DEFAULT_VISION_BATCH_FRAMES = PrefillSettings().vision_batch_frames


class Engine:
    """A loaded model, a carried-state policy and video settings: prefill videos, answer questions.

    layout: "prefix-first" (default: the model's own chat format, so `Full()` equals the plain model on the
    sequence its processor builds, and every chunk also attends to the system prompt) or "video-first" (the
    StateKV paper's setting: a chunk attends to [video-open token | carried state | itself]; the chat text before
    the video moves after it, in front of the question). prefix-first is the default because it is the sequence
    the checkpoint was trained on; video-first makes the cache independent of the system prompt.

    chunks_per_step: chunks fed per model call. With k > 1 the k chunks of a step attend to each other in full
    (causal) and the policy selects once per step, so results differ from k = 1 for the approximate policies
    (`Full()` is the same for every k); larger steps use the accelerator better.

    answer_from: "chunks" (default) keeps every chunk's own KV and answers attend to all of it (or to what
    retrieval picks); "state" keeps only the bounded carried state — no chunk reaches a sink or the result — and
    answers attend to [prefix | state]: with `InfiniPotV(budget)` (or any bounded policy) a cache whose memory
    and stored bytes do not grow with the video.

    compression: optional write-time compression of what each chunk stores (`statekv.compression.Guided`:
    StreamKV's guidance-prompt scoring keeps the top fraction of every chunk's tokens per attention layer). It
    changes only the stored chunk KV, never the carried state; needs answer_from="chunks".

    vision_batch_frames: frames read and encoded by the vision tower per call, in whole steps (at least one): the
    tower's fixed cost is paid once per batch, not per step. Frames never attend to each other in any family's
    tower, so the features equal per-step encoding within float rounding (the step's model call is unchanged);
    host memory grows by the batch's decoded frames and pixels. Not part of the prefill config: a resume may use
    another value. Batches are aligned to the stream's steps, so a resume at a batch boundary (or with a batch of
    one step) is bit for bit one prefill; elsewhere the batch that straddles the resume point differs from it in
    float rounding only (a product's rounding may depend on how many rows it multiplies).
    """

    def __init__(self, adapter: VideoLMAdapter, *, policy: Policy | None = None,
                 sampling: SamplingConfig | None = None, chunks_per_step: int = 1,
                 attention_backend: str = "auto", layout: str = DEFAULT_LAYOUT,
                 segment_rule: SegmentRule | None = None, answer_from: str = "chunks",
                 compression: Guided | None = None,
                 device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES,
                 vision_batch_frames: int = DEFAULT_VISION_BATCH_FRAMES) -> None:
        if chunks_per_step < 1:
            raise ValueError(f"chunks_per_step must be >= 1, got {chunks_per_step}")
        if vision_batch_frames < 1:
            raise ValueError(f"vision_batch_frames must be >= 1, got {vision_batch_frames}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
        self.adapter = adapter
        self.policy = policy if policy is not None else StateKV()
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.chunks_per_step = chunks_per_step
        self.vision_batch_frames = vision_batch_frames
        self.attention_backend = attention_backend
        self.layout = layout
        check_answer_from(answer_from, compression)
        self.answer_from = answer_from
        self.compression = compression
        # scenes for segment retrieval, from consecutive chunks' mean input embeddings (StreamKV's rule)
        self.segment_rule = segment_rule if segment_rule is not None else SegmentRule()
        # answer contexts (the video's KV, concatenated, on the device) reused across questions; 0 keeps none
        self.device_caches = DeviceCacheLRU(device_cache_bytes)
        self._checked: weakref.WeakValueDictionary[int, VideoKVCache] = weakref.WeakValueDictionary()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, policy: Policy | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        sampling: SamplingConfig | None = None, chunks_per_step: int = 1,
                        attention_backend: str = "auto", layout: str = DEFAULT_LAYOUT,
                        adapter_options: dict[str, Any] | None = None, answer_from: str = "chunks",
                        compression: Guided | None = None, device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES,
                        vision_batch_frames: int = DEFAULT_VISION_BATCH_FRAMES,
                        **from_pretrained_kwargs: Any) -> "Engine":
        """Load a checkpoint of a supported family (local directory or hub id). CUDA + bf16 when available."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        adapter = load_adapter(name_or_path, device=device, dtype=dtype, adapter_options=adapter_options,
                               **from_pretrained_kwargs)
        return cls(adapter, policy=policy, sampling=sampling, chunks_per_step=chunks_per_step,
                   attention_backend=attention_backend, layout=layout, answer_from=answer_from,
                   compression=compression, device_cache_bytes=device_cache_bytes,
                   vision_batch_frames=vision_batch_frames)

    @classmethod
    def from_settings(cls, name_or_path: str | os.PathLike, settings: PrefillSettings, *,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      device_cache_bytes: int = DEFAULT_DEVICE_CACHE_BYTES, **from_pretrained_kwargs: Any) -> "Engine":
        """An engine that prefills with `settings` (statekv/settings.py): how the command line, the indexing job
        and a resume build one. With a cache's recorded settings (`PrefillSettings.from_record`) it makes caches
        with exactly that record."""
        return cls.from_pretrained(
            name_or_path, policy=make_policy(settings.policy, **settings.policy_settings), device=device, dtype=dtype,
            sampling=SamplingConfig(**settings.sampling), chunks_per_step=settings.chunks_per_step,
            attention_backend=settings.attention_backend, layout=settings.layout,
            adapter_options=dict(settings.adapter_options), answer_from=settings.answer_from,
            compression=make_compression(settings.compression), device_cache_bytes=device_cache_bytes,
            vision_batch_frames=settings.vision_batch_frames, **from_pretrained_kwargs)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def model_info(self) -> ModelInfo:
        a = self.adapter
        return ModelInfo(a.name_or_path, a.model_type, a.fingerprint(), a.layout.num_layers,
                         a.layout.num_kv_heads, a.layout.head_dim, list(a.layout.linear_layers),
                         layout_version=a.layout_version, transformers_version=transformers.__version__)

    def prefill_config(self) -> PrefillConfig:
        """The settings recorded with every cache this engine makes (a resume must match them)."""
        return PrefillConfig(policy=self.policy.settings(), chunks_per_step=self.chunks_per_step,
                             layout=self.layout, sampling=dataclasses.asdict(self.sampling),
                             adapter=self.adapter.options(), attention_backend=self.attention_backend,
                             answer_from=self.answer_from,
                             compression=None if self.compression is None else self.compression.settings())

    # --- prefill ---------------------------------------------------------------------------------------------

    def prefill(self, video: VideoInput, *, fps: float | None = None, resume_from: VideoKVCache | None = None,
                sink: ChunkSink | None = None, keep_chunks: bool = True,
                progress: Callable[[int, int], None] | None = None,
                storage_options: dict[str, Any] | None = None, backend: str = "auto") -> VideoKVCache:
        """Prefill a video (path, URL, file object, an opened `VideoSource`, or uint8 frames (T, H, W, 3) with
        their `fps`).

        Files, URLs and sources are sampled at `sampling.fps`; frame arrays are taken as already sampled, at `fps`.
        A `VideoSource` passed in stays open: its caller owns it.
        With `resume_from`, the frames continue that cache's video (its carried state and positions); the
        engine's prefill config must equal the cache's (else `PrefillConfigMismatchError` names the field).
        Each chunk is passed to `sink` as soon as it is made; `keep_chunks=False` keeps none in the result.
        `backend` picks the decoder for paths and URLs (see `statekv.video.open_video`).
        """
        if resume_from is not None:
            self._check_resumable(resume_from)
        owned = not isinstance(video, VideoSource)
        source, indices, video_info = self._open(video, fps, storage_options, backend)
        try:
            with torch.inference_mode():
                return self._prefill(source, indices, video_info, resume_from, sink, keep_chunks, progress)
        finally:
            if owned:
                source.close()

    def _open(self, video: VideoInput, fps: float | None, storage_options: dict[str, Any] | None,
              backend: str = "auto"):
        if isinstance(video, VideoSource):
            source = video
            sampling = sample_source(source, self.sampling)
        elif isinstance(video, np.ndarray):
            if fps is None or fps <= 0:
                raise VideoError("<frames>", "frames given as an array need their fps (fps=...)")
            source = FramesSource(video, fps)
            sampling = take_all(source.num_frames, fps)
        else:
            source = open_video(video, backend=backend, storage_options=storage_options)
            try:
                sampling = sample_source(source, self.sampling)
            except BaseException:
                source.close()
                raise
        indices, sampled_fps = sampling.indices, sampling.sampled_fps
        if len(indices) == 0:
            if not isinstance(video, VideoSource):
                source.close()
            raise VideoError(source.source, "no frames to prefill")
        info = VideoInfo(
            source=source.source, video_fps=float(source.fps), total_frames=int(source.num_frames),
            sampled_fps=sampled_fps, frame_size=self.adapter.frame_size(source.height, source.width, self.sampling,
                                                                 num_frames=len(indices)),
            frame_indices=[int(i) for i in indices], timestamps=sampling.timestamps.tolist(),
            requested_fps=sampling.requested_fps, duration=sampling.duration,
            segments=[segment(source.source, sampling, size=(source.width, source.height),
                              start=float(getattr(source, "start_time", 0.0)))],
        )
        return source, indices, info

    def _new_cache(self, info: VideoInfo, num_frames: int
                   ) -> tuple[VideoKVCache, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill the prefix: the start of every video's cache."""
        a = self.adapter
        prefix_ids = a.prefix_ids(self.layout)
        cursor = a.plan_video(a.new_cursor(prefix_len=len(prefix_ids), frame_size=info.frame_size,
                                           sampled_fps=info.sampled_fps), num_frames)
        linear = a.layout.linear_layers
        dyn = DynamicCache(config=a.model.config)
        recurrent: dict[int, RecurrentState] = {}
        if len(prefix_ids):
            a.decode(a.embed(prefix_ids), a.text_positions(0, len(prefix_ids)), dyn,
                     statekv_backend=self.attention_backend, **a.decoder_kwargs(cursor))
            prefix_kv = [None if i in linear else (layer.keys, layer.values)  # each (1, Hkv, P, D)
                         for i, layer in enumerate(dyn.layers)]
            recurrent = read_recurrent(dyn, linear)
        else:
            empty = torch.empty(1, a.layout.num_kv_heads, 0, a.layout.head_dim, dtype=a.dtype, device=self.device)
            prefix_kv = [None if i in linear else (empty, empty) for i in range(a.layout.num_layers)]
        cache = VideoKVCache(
            model=self.model_info(), config=self.prefill_config(), dtype=a.dtype, video=info,
            prefix_ids=prefix_ids.clone(),
            prefix_keys=[None if kv is None else kv[0][0].to("cpu", copy=True) for kv in prefix_kv],
            prefix_values=[None if kv is None else kv[1][0].to("cpu", copy=True) for kv in prefix_kv],
            cursor=cursor,
            prefix_recurrent={i: r.to("cpu", copy=True) for i, r in recurrent.items()},
            recurrent={i: r.to("cpu", copy=True) for i, r in recurrent.items()},
        )
        return cache, prefix_kv

    def _check_resumable(self, cache: VideoKVCache) -> None:
        self.check_cache(cache)
        mine = self.prefill_config()
        where = cache.config.first_difference(mine)
        if where is not None:
            raise PrefillConfigMismatchError(where, _lookup(cache.config, where), _lookup(mine, where))

    def _resume(self, cache: VideoKVCache, info: VideoInfo, keep_chunks: bool):
        """Continue `cache`'s video: same model, prefill config and frame size; frames and times continue after it."""
        old = cache.video
        offset_frames = old.frame_indices[-1] + 1 if old.frame_indices else 0
        # the stream's first source and the new one, resized by the family's rule for the same frame count: a
        # different result means another shape would be squeezed into the stream's patch grid (refused)
        first_w, first_h = old.segments[0]["size"] if old.segments else (old.frame_size[1], old.frame_size[0])
        expected = self.adapter.frame_size(first_h, first_w, self.sampling, num_frames=len(info.frame_indices))
        offset_time, segments = resume_timing(old.segments, old.timestamps, old.duration, old.sampled_fps,
                                              info.segments[0], frame_size=expected,
                                              new_frame_size=info.frame_size)
        video = VideoInfo(
            source=old.source, video_fps=old.video_fps, total_frames=old.total_frames + info.total_frames,
            sampled_fps=old.sampled_fps, frame_size=old.frame_size,
            frame_indices=old.frame_indices + [offset_frames + i for i in info.frame_indices],
            timestamps=old.timestamps + [offset_time + t for t in info.timestamps],
            requested_fps=old.requested_fps, duration=offset_time + info.duration, segments=segments,
        )
        resumed = dataclasses.replace(cache, video=video, chunks=list(cache.chunks) if keep_chunks else [],
                                      chunk_tokens=list(cache.chunk_tokens), cursor=dict(cache.cursor),
                                      recurrent=dict(cache.recurrent))
        dev = self.device
        prefix_kv = [None if k is None else (k.to(dev).unsqueeze(0), v.to(dev).unsqueeze(0))
                     for k, v in zip(cache.prefix_keys, cache.prefix_values)]
        return resumed, prefix_kv, len(old.frame_indices)

    def _prefill(self, source, indices: np.ndarray, info: VideoInfo, resume_from: VideoKVCache | None,
                 sink: ChunkSink | None, keep_chunks: bool, progress) -> VideoKVCache:
        a = self.adapter
        if resume_from is None:
            cache, prefix_kv = self._new_cache(info, len(indices))
            first_frame = 0
        else:
            cache, prefix_kv, first_frame = self._resume(resume_from, info, keep_chunks)
        dev = self.device
        linear = a.layout.linear_layers
        states: list[LayerState | None] = (
            [None if s is None else s.to(dev) for s in cache.state] if cache.state is not None
            else [None] * a.layout.num_layers
        )
        recurrent = {i: r.to(dev) for i, r in cache.recurrent.items()}  # linear layers: exact states, carried
        # carried per-token scores of the states (StateKV decay, InfiniPot-V novelty): not part of the KV buffers
        carried = [None if s is None else s.scores for s in states]
        step_frames = a.frames_per_chunk * self.chunks_per_step
        total_chunks = math.ceil(len(indices) / a.frames_per_chunk)
        prefix_len = cache.prefix_len
        frame_lo = first_frame
        done = 0
        scenes = SegmentTracker(self.segment_rule, cache.scenes, cache.num_chunks)
        # one cache for the whole video: [prefix | state | step] buffers per attention layer, updated in place
        step_cache: StepCache | None = None
        steps_per_batch = max(1, self.vision_batch_frames // step_frames)
        for frames, features in _encoded_steps(a, source, indices, cache.video.frame_size, step_frames,
                                               steps_per_batch, first_step=cache.num_chunks // self.chunks_per_step):
            # frame times from the integer indices (as the processors compute them; exact across a resume)
            times = [i / cache.video.video_fps for i in cache.video.frame_indices[frame_lo:frame_lo + len(frames)]]
            inputs = a.chunk_inputs(frames, cache.cursor, timestamps=times, features=features)
            n = inputs.embeds.shape[0]
            if step_cache is None:
                step_cache = StepCache(a.model.config, prefix_kv, states, recurrent,
                                       reserve=n + _state_reserve(self.policy, n))
            step_cache.begin_step()
            scores: dict[int, torch.Tensor] | None = {} if self.policy.needs_scores else None
            a.decode(inputs.embeds, inputs.position_ids, step_cache, statekv_scores=scores,
                     statekv_backend=self.attention_backend, **inputs.decoder_kwargs)
            # the step's own KV leaves the device in one transfer, in flight while the policy runs
            host = step_cache.step_to_host() if self.answer_from == "chunks" else None
            kept = None if self.compression is None else iter(compress_step(  # what each chunk stores (not the state)
                self.compression, a, [None if i in linear else (layer.keys, layer.values)  # [prefix | state | step]
                                      for i, layer in enumerate(step_cache.layers)],
                read_recurrent(step_cache, linear), inputs.cursor, inputs.chunk_tokens, layout=self.layout,
                backend=self.attention_backend, build_cache=build_cache))  # before the policy overwrites the step
            first_token = cache.num_video_tokens
            # the step's chunk sizes, for a policy that works in frames (InfiniPot-V): the policy stays model-free
            chunk_kw = {"chunk_tokens": tuple(inputs.chunk_tokens)} if self.policy.needs_chunk_tokens else {}
            for layer in step_cache.attention:  # linear-attention layers: their states are exact, no policy
                buffers = step_cache.layers[layer]
                layer_scores = None if scores is None else scores[layer][0, :, prefix_len:]
                state = self.policy.update_merged(buffers.merged(first_token), buffers.state_size,
                                                  carried[layer], layer_scores, **chunk_kw)
                buffers.commit(state)  # written into the buffer (nothing moves when it already lies there)
                carried[layer] = state.scores
            step_kv = host.wait() if host is not None else [None] * a.layout.num_layers  # per layer (Hkv, n, D)
            lo = 0
            for tokens, n_frames in zip(inputs.chunk_tokens, inputs.chunk_frames):
                rows = slice(lo, lo + tokens)
                scenes.add(inputs.embeds[rows].float().mean(dim=0))
                chunk = ChunkKV(
                    index=cache.num_chunks, frame_range=(frame_lo, frame_lo + n_frames),
                    source_frames=cache.video.frame_indices[frame_lo:frame_lo + n_frames],
                    timestamps=cache.video.timestamps[frame_lo:frame_lo + n_frames],
                    position_ids=inputs.position_ids[:, rows].clone(),
                    keys=[None if kv is None else kv[0][:, rows] for kv in step_kv],  # host views, one block a step
                    values=[None if kv is None else kv[1][:, rows] for kv in step_kv],
                )
                if kept is not None:
                    chunk = keep_tokens(chunk, next(kept))
                if self.answer_from == "chunks":
                    chunk.pre_rope_summaries = pre_rope_summaries(a, chunk, inputs.decoder_kwargs)
                    if sink is not None:
                        sink(chunk)
                    if keep_chunks:
                        cache.chunks.append(chunk)
                cache.num_chunks += 1
                cache.chunk_tokens.append(tokens)
                lo += tokens
                frame_lo += n_frames
                done += 1
            del step_kv, scores
            cache.cursor = inputs.cursor
            cache.scenes = scenes.segments
            if progress is not None:
                progress(done, total_chunks)
            # nothing of this step outlives it: its inputs are views of its vision batch's features, which would
            # otherwise stay alive through the next batch's tower call
            del inputs, features, host, kept, chunk
        if step_cache is not None:
            for layer in step_cache.attention:
                state = step_cache.layers[layer].state()
                states[layer] = LayerState(_to_host(state.keys), _to_host(state.values), _to_host(state.token_index),
                                           None if carried[layer] is None else _to_host(carried[layer]))
            recurrent = read_recurrent(step_cache, linear)
        cache.state = [None if s is None else s.to("cpu") for s in states]
        cache.recurrent = {i: r.to("cpu", copy=True) for i, r in recurrent.items()}
        logger.info("prefilled %s: %d chunks, %d video tokens, state %s", cache.video.source, cache.num_chunks,
                    cache.num_video_tokens, cache.state_sizes())
        return cache

    # --- answering (handed over to statekv/answering.py) ------------------------------------------------------

    def ask(self, cache: VideoKVCache, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, output_scores: bool = False,
            retrieval: Retrieval | None = None) -> Answer:
        """Answer `question` about the cached video (greedy by default). The cache is not changed.

        With `retrieval` (e.g. `statekv.retrieval.TopK(k=64, recent=8)`) each layer attends to the prefix, the
        chunks chosen for this question and the question only; on a lazily loaded stored cache only the chosen
        chunks' bytes are read. `Answer.evidence` then lists those chunks with their time ranges.
        Without retrieval the video's KV is shared with other questions on it (see `ask_many`).
        """
        return self.ask_many(cache, [AnswerRequest(question, max_new_tokens, temperature, top_p, seed,
                                                   output_scores, retrieval)])[0]

    def ask_many(self, cache: VideoKVCache, requests: list[AnswerRequest | str], *, max_batch: int = 32,
                 sync_every: int = DEFAULT_SYNC_EVERY) -> list[Answer]:
        """Answer several questions about one video together: one forward per step for up to `max_batch` of
        them (each with its own prompt length, `max_new_tokens`, sampling, stopping and retrieval; greedy answers
        equal answering each alone). A string is a greedy `AnswerRequest` of 64 tokens. The cache is not changed."""
        requests = [AnswerRequest(r) if isinstance(r, str) else r for r in requests]
        self.check_cache(cache)
        return answer_all(self, cache, requests, max_batch=max_batch, sync_every=sync_every)

    def stream(self, cache: VideoKVCache, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, output_logits: bool = False,
               retrieval: Retrieval | None = None, evidence: list[Evidence] | None = None) -> Iterator[TokenEvent]:
        """Generate the answer token by token; stops after an end-of-sequence token or `max_new_tokens`.

        With `retrieval` see `ask`; the chosen chunks are appended to `evidence` (a list) once the question's first
        pass has run, before the first token is yielded.
        """
        request = AnswerRequest(question, max_new_tokens, temperature, top_p, seed, output_logits, retrieval)
        return stream_answer(self, cache, request, evidence=evidence)

    def answer_prompt(self, cache: VideoKVCache, question: str):
        """What follows the video for `question` (`AnswerInputs`), in the cache's layout."""
        return self.adapter.answer_inputs(question, cache.cursor, cache.config.layout)

    def device_video(self, cache: VideoKVCache) -> DeviceVideo:
        """The cache's answer context on the device, from the device LRU (built and kept on a miss)."""
        a = self.adapter
        return self.device_caches.get(cache, lambda: DeviceVideo.from_cache(
            cache, a.layout.num_layers, a.layout.linear_layers, self.device))

    def decoder(self, cache: VideoKVCache, *, max_batch: int = 32,
                sync_every: int = DEFAULT_SYNC_EVERY) -> BatchDecoder:
        """A batch decoder over the cache (statekv/decoding.py); add questions with `answer_prompt`."""
        self.check_cache(cache)
        return BatchDecoder(self.adapter, cache, lambda: self.device_video(cache),
                            self.adapter.decoder_kwargs(cache.cursor), backend=self.attention_backend,
                            max_batch=max_batch, sync_every=sync_every)

    def check_cache(self, cache: VideoKVCache) -> None:
        """Raise unless this model can answer from (or resume) `cache`: ModelMismatchError / CacheLayoutError for
        another model or token layout (skipped for a cache the store already checked against this model at
        load: `committed.checked_for`), CacheCorruptError if what it says about its sequence cannot be this
        model's: its family cursor (opaque to the store, so only the adapter can tell a lie in it: a video start of
        -1000, a [0, 0] grid; checked before any position is computed from it) or its prefix tokens (what this
        model's chat template gives for the cache's recorded layout: a flipped `prefill.layout` would put the
        question's text in the wrong place). Every answer and resume calls it, a service at load; a cache object
        is checked once (a passed check is remembered for as long as the object lives)."""
        from statekv.store.errors import CacheCorruptError  # a stored cache's fault: the service's cache_corrupt

        if self._checked.get(id(cache)) is cache:
            return
        mine = self.model_info()
        if cache.committed is None or cache.committed.checked_for != mine:
            mine.check_serves(cache.model, cache.video.source)
        video = cache.committed.video_id if cache.committed is not None else cache.video.source
        problem = self.adapter.cursor_problem(cache.cursor, prefix_len=cache.prefix_len, num_chunks=cache.num_chunks)
        if problem is not None:
            raise CacheCorruptError(video, "manifest.json field 'family.cursor'", problem)
        layout = cache.config.layout
        expected = self.adapter.prefix_ids(layout)
        if cache.prefix_ids is not None and not torch.equal(cache.prefix_ids.cpu(), expected):
            raise CacheCorruptError(video, "manifest.json field 'prefill.layout'",
                                    f"the stored prefix ({cache.prefix_len} tokens) is not what this model's chat "
                                    f"template gives for layout {layout!r} ({len(expected)} tokens): a wrong layout "
                                    f"or another chat template")
        self._checked[id(cache)] = cache


def pre_rope_summaries(adapter: VideoLMAdapter, chunk: ChunkKV, decoder_kwargs: dict[str, Any]
                       ) -> list[torch.Tensor | None]:
    """Per layer the float32 (Hkv, D) mean of the chunk's stored keys before RoPE (each un-rotated at its own
    position by the family's adapter): ReKV's block key, which `TopK(query="question")` scores; the store keeps it
    beside the post-RoPE summary so a question reads no K/V to score. They stay on the keys' device (the writer
    moves them to the host with the rest of the chunk): no host sync per layer during a prefill."""
    cos, sin = adapter.rotary(chunk.position_ids, **decoder_kwargs)  # once per chunk: (n, rotary dims)
    out: list[torch.Tensor | None] = []
    for layer, k in enumerate(chunk.keys):
        if k is None:  # a linear-attention layer
            out.append(None)
            continue
        stored = chunk.token_index(layer).to(cos.device)  # the layer's stored tokens (all n unless compressed)
        out.append(unrotate(k, cos[stored].to(k.device), sin[stored].to(k.device)).mean(dim=1))
    return out


def build_cache(config: Any, kv: list[tuple[torch.Tensor, torch.Tensor] | None],
                recurrent: dict[int, RecurrentState]) -> DynamicCache:
    """A transformers cache holding `kv` (1, Hkv, S, D) at attention layers (None at linear ones) and COPIES of the
    linear layers' states (transformers updates those in place during decoding)."""
    dyn = DynamicCache(ddp_cache_data=[(None, None) if x is None else x for x in kv], config=config)
    for layer, state in recurrent.items():
        dyn.update_conv_state(state.conv.unsqueeze(0), layer)  # a fresh layer: allocates and copies
        dyn.update_recurrent_state(state.recurrent.unsqueeze(0), layer)
    return dyn


def _encoded_steps(adapter: VideoLMAdapter, source, indices: np.ndarray, frame_size, step_frames: int,
                   steps_per_batch: int, *, first_step: int = 0) -> Iterator[tuple[np.ndarray, Any]]:
    """(frames, vision features) of each prefill step, the features of `steps_per_batch` steps from one tower call.

    Batches are aligned to the stream's step count (`first_step` steps were prefilled before this call), so a
    resume at a batch boundary encodes exactly the batches one uninterrupted prefill encodes."""
    batch = step_frames * steps_per_batch
    head = min((-first_step % steps_per_batch) * step_frames, len(indices))  # the rest of a batch begun before
    parts = [(indices[:head], head), (indices[head:], batch)]
    for part, size in parts:
        if len(part) == 0:
            continue
        for frames in iter_frame_batches(source, part, size):
            steps = adapter.step_features(frames, frame_size, step_frames)
            for i in range(len(steps)):
                features, steps[i] = steps[i], None
                yield frames[i * step_frames:(i + 1) * step_frames], features
            del frames, steps, features  # not held while the next batch is read and encoded


def _state_reserve(policy: Policy, step_tokens: int) -> int:
    """Columns to reserve for the carried state: a bounded policy's size, else room for a few steps (the buffers
    double when `Full` outgrows them)."""
    bound = getattr(policy, "capacity", None) or getattr(policy, "budget", None)
    return int(bound) if isinstance(bound, int) else 8 * step_tokens


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy that shares no memory with the device buffers (on CPU too)."""
    return t.to("cpu", copy=True)


def read_recurrent(dyn: DynamicCache, layers: tuple[int, ...]) -> dict[int, RecurrentState]:
    """The linear layers' states in `dyn` after a forward, copied out (the cache reuses its buffers)."""
    out = {}
    for layer in layers:
        if getattr(dyn.layers[layer], "number_of_states", 1) != 1:
            raise NotImplementedError(f"layer {layer}: linear-attention layers with several states")
        conv, rec = dyn.get_conv_state(layer), dyn.get_recurrent_state(layer)
        if conv is not None and rec is not None:
            out[layer] = RecurrentState(conv[0].clone(), rec[0].clone())
    return out


def _lookup(config: PrefillConfig, where: str) -> Any:
    value: Any = config.to_dict()
    for part in where.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value
