"""The streaming prefill engine: a video in, a `VideoKVCache` out, then any number of questions answered on it.

Prefill runs the text prefix once, then the video chunk after chunk (a chunk = one temporal patch = two sampled
frames; `chunks_per_step` of them per model call). At every layer a step attends to
[prefix | carried state | itself, causal]; the policy then picks the next carried state. Each chunk's own KV leaves
the model's device as soon as it is made, so device memory depends on prefix + capacity + step, not on video length.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers import DynamicCache

from statekv.cache import ChunkKV, ModelInfo, VideoInfo, VideoKVCache
from statekv.errors import ModelMismatchError, VideoError
from statekv.generation import next_token
from statekv.models import VideoLMAdapter, load_adapter
from statekv.policies import LayerState, Policy, StateKV, make_policy
from statekv.video import (FramesSource, SamplingConfig, VideoSource, iter_frame_batches, open_video,
                           preprocess_frames, smart_resize)
from statekv.video.sampling import resume_timing, sample_source, segment, take_all

logger = logging.getLogger(__name__)

VideoInput = str | os.PathLike | BinaryIO | np.ndarray | VideoSource
ChunkSink = Callable[[ChunkKV], None]


@dataclass
class Answer:
    """A generated answer and what it was generated from."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]  # the tokens placed after the video: rest of the user turn, question, answer header
    finish_reason: str  # "eos" or "length"
    scores: list[torch.Tensor] | None = None  # with output_scores: float logits (V,) of each generated step
    first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass
class TokenEvent:
    """One generated token while streaming; `text` is the new text it completes (may be empty)."""

    token_id: int
    text: str
    logits: torch.Tensor | None = field(default=None, repr=False)


class Engine:
    """A loaded model, a carried-state policy and video settings: prefill videos, answer questions."""

    def __init__(self, adapter: VideoLMAdapter, *, policy: Policy | None = None,
                 sampling: SamplingConfig | None = None, chunks_per_step: int = 1,
                 attention_backend: str = "auto") -> None:
        if chunks_per_step < 1:
            raise ValueError(f"chunks_per_step must be >= 1, got {chunks_per_step}")
        self.adapter = adapter
        self.policy = policy if policy is not None else StateKV()
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.chunks_per_step = chunks_per_step
        self.attention_backend = attention_backend

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, policy: Policy | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        sampling: SamplingConfig | None = None, chunks_per_step: int = 1,
                        attention_backend: str = "auto", **from_pretrained_kwargs: Any) -> "Engine":
        """Load a Qwen2-VL / Qwen2.5-VL checkpoint (local directory or hub id). CUDA + bf16 when available."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        adapter = load_adapter(name_or_path, device=device, dtype=dtype, **from_pretrained_kwargs)
        return cls(adapter, policy=policy, sampling=sampling, chunks_per_step=chunks_per_step,
                   attention_backend=attention_backend)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def model_info(self) -> ModelInfo:
        a = self.adapter
        return ModelInfo(a.name_or_path, a.model_type, a.fingerprint(), a.layout.num_layers,
                         a.layout.num_kv_heads, a.layout.head_dim, a.video_token_id)

    # --- prefill ---------------------------------------------------------------------------------------------

    def prefill(self, video: VideoInput, *, fps: float | None = None, resume_from: VideoKVCache | None = None,
                sink: ChunkSink | None = None, keep_chunks: bool = True,
                progress: Callable[[int, int], None] | None = None,
                storage_options: dict[str, Any] | None = None, backend: str = "auto") -> VideoKVCache:
        """Prefill a video (path, URL, file object, an opened `VideoSource`, or uint8 frames (T, H, W, 3) with
        their `fps`).

        Files, URLs and sources are sampled at `sampling.fps`; frame arrays are taken as already sampled, at `fps`.
        A `VideoSource` passed in stays open: its caller owns it.
        With `resume_from`, the frames continue that cache's video (its carried state and positions).
        Each chunk is passed to `sink` as soon as it is made; `keep_chunks=False` keeps none in the result.
        `backend` picks the decoder for paths and URLs (see `statekv.video.open_video`).
        """
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
        a = self.adapter
        frame_size = smart_resize(source.height, source.width, factor=a.patch_size * a.merge_size,
                                  min_pixels=self.sampling.min_pixels, max_pixels=self.sampling.max_pixels)
        info = VideoInfo(
            source=source.source, video_fps=float(source.fps), total_frames=int(source.num_frames),
            sampled_fps=sampled_fps, second_per_grid_t=a.temporal_patch_size / sampled_fps,
            frame_size=frame_size, grid_hw=(frame_size[0] // a.patch_size, frame_size[1] // a.patch_size),
            frame_indices=[int(i) for i in indices], timestamps=sampling.timestamps.tolist(),
            requested_fps=sampling.requested_fps, duration=sampling.duration,
            segments=[segment(source.source, sampling, size=(source.width, source.height),
                              start=float(getattr(source, "start_time", 0.0)))],
        )
        return source, indices, info

    def _new_cache(self, info: VideoInfo) -> tuple[VideoKVCache, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prefill the text prefix: the start of every video's cache."""
        a = self.adapter
        prefix_ids = a.prefix_ids
        dyn = DynamicCache(config=a.model.config)
        a.decode(a.embed(prefix_ids), a.text_positions(0, len(prefix_ids)), dyn,
                 statekv_backend=self.attention_backend)
        prefix_kv = [(layer.keys, layer.values) for layer in dyn.layers]  # each (1, Hkv, P, D)
        cache = VideoKVCache(
            model=self.model_info(), policy=self.policy.settings(), dtype=a.dtype, video=info,
            prefix_ids=prefix_ids.clone(),
            prefix_keys=[k[0].to("cpu", copy=True) for k, _ in prefix_kv],
            prefix_values=[v[0].to("cpu", copy=True) for _, v in prefix_kv],
            max_position=len(prefix_ids) - 1,
        )
        return cache, prefix_kv

    def _resume(self, cache: VideoKVCache, info: VideoInfo, keep_chunks: bool):
        """Continue `cache`'s video: same model, policy and frame size; frames and times continue after it."""
        self._check_compatible(cache)
        if cache.policy != self.policy.settings():
            raise ModelMismatchError("policy", str(cache.policy), str(self.policy.settings()))
        old = cache.video
        offset_frames = old.frame_indices[-1] + 1 if old.frame_indices else 0
        offset_time, segments = resume_timing(old.segments, old.timestamps, old.duration, old.sampled_fps,
                                              info.segments[0], frame_size=old.frame_size,
                                              new_frame_size=info.frame_size)
        video = VideoInfo(
            source=old.source, video_fps=old.video_fps, total_frames=old.total_frames + info.total_frames,
            sampled_fps=old.sampled_fps, second_per_grid_t=old.second_per_grid_t, frame_size=old.frame_size,
            grid_hw=old.grid_hw,
            frame_indices=old.frame_indices + [offset_frames + i for i in info.frame_indices],
            timestamps=old.timestamps + [offset_time + t for t in info.timestamps],
            requested_fps=old.requested_fps, duration=offset_time + info.duration, segments=segments,
        )
        resumed = VideoKVCache(
            model=cache.model, policy=cache.policy, dtype=cache.dtype, video=video, prefix_ids=cache.prefix_ids,
            prefix_keys=cache.prefix_keys, prefix_values=cache.prefix_values,
            chunks=list(cache.chunks) if keep_chunks else [], state=cache.state, grid_t=cache.grid_t,
            max_position=cache.max_position,
        )
        dev = self.device
        prefix_kv = [(k.to(dev).unsqueeze(0), v.to(dev).unsqueeze(0))
                     for k, v in zip(cache.prefix_keys, cache.prefix_values)]
        return resumed, prefix_kv, len(old.frame_indices)

    def _prefill(self, source, indices: np.ndarray, info: VideoInfo, resume_from: VideoKVCache | None,
                 sink: ChunkSink | None, keep_chunks: bool, progress) -> VideoKVCache:
        a = self.adapter
        if resume_from is None:
            cache, prefix_kv = self._new_cache(info)
            first_frame = 0
        else:
            cache, prefix_kv, first_frame = self._resume(resume_from, info, keep_chunks)
        dev = self.device
        states: list[LayerState | None] = (
            [s.to(dev) for s in cache.state] if cache.state is not None else [None] * a.layout.num_layers
        )
        step_frames = a.temporal_patch_size * self.chunks_per_step
        total_chunks = math.ceil(len(indices) / a.temporal_patch_size)
        tokens_per_chunk = cache.tokens_per_chunk
        done = 0
        for step, frames in enumerate(iter_frame_batches(source, indices, step_frames)):
            pre = preprocess_frames(frames, min_pixels=self.sampling.min_pixels,
                                    max_pixels=self.sampling.max_pixels, size=cache.video.frame_size)
            grid_t, grid_h, grid_w = pre.grid_thw
            embeds = a.video_features(pre.pixel_values, pre.grid_thw)  # (n, hidden)
            t0 = cache.grid_t
            positions = a.video_positions(cache.prefix_len, range(t0, t0 + grid_t), grid_h, grid_w,
                                          cache.video.second_per_grid_t)  # (3, n)
            n = embeds.shape[0]
            dyn = DynamicCache(
                ddp_cache_data=[
                    (pk, pv) if s is None else (torch.cat([pk, s.keys.unsqueeze(0)], 2),
                                                torch.cat([pv, s.values.unsqueeze(0)], 2))
                    for (pk, pv), s in zip(prefix_kv, states)
                ],
                config=a.model.config,
            )
            scores: dict[int, torch.Tensor] | None = {} if self.policy.needs_scores else None
            a.decode(embeds, positions, dyn, statekv_scores=scores, statekv_backend=self.attention_backend)
            keys = [layer.keys[0, :, -n:] for layer in dyn.layers]  # per layer (Hkv, n, D)
            values = [layer.values[0, :, -n:] for layer in dyn.layers]
            token_index = torch.arange(t0 * tokens_per_chunk, t0 * tokens_per_chunk + n, device=dev)
            for layer, (k, v) in enumerate(zip(keys, values)):
                chunk_state = LayerState(k, v, token_index.expand(k.shape[0], -1))
                layer_scores = None if scores is None else scores[layer][0, :, cache.prefix_len:]
                states[layer] = self.policy.update(states[layer], chunk_state, layer_scores)
            # the chunk's own KV leaves the device now, one record per temporal patch
            for j in range(grid_t):
                rows = slice(j * tokens_per_chunk, (j + 1) * tokens_per_chunk)
                frame_lo = first_frame + (step * step_frames) + j * a.temporal_patch_size
                frame_hi = min(frame_lo + a.temporal_patch_size, first_frame + len(indices))
                chunk = ChunkKV(
                    index=t0 + j, frame_range=(frame_lo, frame_hi),
                    source_frames=cache.video.frame_indices[frame_lo:frame_hi],
                    timestamps=cache.video.timestamps[frame_lo:frame_hi],
                    position_ids=positions[:, rows].clone(),
                    keys=[k[:, rows].to("cpu", copy=True) for k in keys],
                    values=[v[:, rows].to("cpu", copy=True) for v in values],
                )
                if sink is not None:
                    sink(chunk)
                if keep_chunks:
                    cache.chunks.append(chunk)
            del dyn, keys, values  # nothing of this step stays on the device but the carried state
            cache.grid_t += grid_t
            cache.max_position = max(cache.max_position, int(positions.max()))
            done += grid_t
            if progress is not None:
                progress(done, total_chunks)
        cache.state = [s.to("cpu") for s in states]
        logger.info("prefilled %s: %d chunks, %d video tokens, state %s", cache.video.source, cache.grid_t,
                    cache.num_video_tokens, cache.state_sizes())
        return cache

    # --- answering -------------------------------------------------------------------------------------------

    def ask(self, cache: VideoKVCache, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, output_scores: bool = False) -> Answer:
        """Answer `question` about the cached video (greedy by default). The cache is not changed."""
        start = time.perf_counter()
        first = 0.0
        ids: list[int] = []
        logits: list[torch.Tensor] = []
        finish = "length"
        for event in self.stream(cache, question, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, output_logits=output_scores):
            if not ids:
                first = time.perf_counter() - start
            ids.append(event.token_id)
            if output_scores:
                logits.append(event.logits)
            if event.token_id in self.adapter.eos_token_ids:
                finish = "eos"
        text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True)
        return Answer(text=text, token_ids=ids, prompt_ids=self.adapter.question_ids(question).tolist(),
                      finish_reason=finish, scores=logits if output_scores else None, first_token_s=first,
                      total_s=time.perf_counter() - start)

    def stream(self, cache: VideoKVCache, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, output_logits: bool = False) -> Iterator[TokenEvent]:
        """Generate the answer token by token; stops after an end-of-sequence token or `max_new_tokens`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_compatible(cache)
        a = self.adapter
        prompt = a.question_ids(question)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tokenizer = a.tokenizer
        with torch.inference_mode():
            dev = self.device
            dyn = DynamicCache(
                ddp_cache_data=[tuple(t.to(dev).unsqueeze(0) for t in cache.layer_kv(i))
                                for i in range(a.layout.num_layers)],
                config=a.model.config,
            )
            position = cache.next_position
            inputs = prompt
            generated: list[int] = []
            emitted = ""
            for step in range(max_new_tokens):
                hidden = a.decode(a.embed(inputs), a.text_positions(position, len(inputs)), dyn,
                                  statekv_backend=self.attention_backend)
                step_logits = a.logits(hidden[-1])
                position += len(inputs)
                token = next_token(step_logits, temperature=temperature, top_p=top_p, generator=generator)
                generated.append(token)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                last = token in a.eos_token_ids or step == max_new_tokens - 1
                delta = ""
                if last or not text.endswith("\ufffd"):  # else wait for the rest of a multi-byte character
                    delta, emitted = text[len(emitted):], text
                yield TokenEvent(token, delta, step_logits.cpu() if output_logits else None)
                if token in a.eos_token_ids:
                    return
                inputs = torch.tensor([token], dtype=torch.long)

    def _check_compatible(self, cache: VideoKVCache) -> None:
        mine = self.model_info()
        if cache.model.fingerprint != mine.fingerprint:
            raise ModelMismatchError(
                "model", f"{cache.model.name_or_path} (fingerprint {cache.model.fingerprint})",
                f"{mine.name_or_path} (fingerprint {mine.fingerprint})")


def policy_from_settings(settings: dict[str, Any]) -> Policy:
    """Rebuild a policy from the settings recorded with a cache."""
    settings = dict(settings)
    return make_policy(settings.pop("name"), **settings)
